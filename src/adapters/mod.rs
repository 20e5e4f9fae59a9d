//! Adapters: the outside world (HTTP, NATS JetStream, Redis, the role service) behind the
//! domain's ports.

pub mod http;
pub mod native;
pub mod nats;
pub mod redis;
pub mod role;

/// A remote server's reply body could not be read within its bound.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reply larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the reply: {0}")]
    Read(#[from] reqwest::Error),
}

/// Reads a reply body of at most `max` bytes. Past it, reading stops and the reply is
/// refused, so a remote server (a declared length or none, chunked) cannot make the relay
/// buffer more than `max` plus one chunk.
pub(crate) async fn read_body(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;

    use super::*;

    /// Serves `/small` (5 bytes), `/declared` (a Content-Length of 2 MB) and `/endless`
    /// (chunks for ever, no length).
    async fn server() -> String {
        let endless = || async {
            let chunks = futures::stream::repeat_with(|| Ok::<_, std::io::Error>(vec![b'x'; 4096]));
            Body::from_stream(chunks)
        };
        let app = Router::new()
            .route("/small", get(|| async { "hello" }))
            .route("/declared", get(|| async { vec![b'x'; 2_000_000] }))
            .route("/endless", get(endless));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_reply_past_the_bound_is_refused_without_reading_it_all() {
        let base = server().await;
        let http = reqwest::Client::new();
        let read = |path: &'static str| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let response = http.get(format!("{base}{path}")).send().await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), read_body(response, 64 * 1024))
                    .await
                    .expect("read_body stops on its own")
            }
        };
        assert_eq!(read("/small").await.unwrap(), b"hello");
        assert!(matches!(read("/declared").await, Err(BodyError::TooLarge(65_536))));
        assert!(matches!(read("/endless").await, Err(BodyError::TooLarge(65_536))));
    }
}
