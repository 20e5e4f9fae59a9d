//! TLS for tests: a throw-away CA, a server certificate it signs for `127.0.0.1` and
//! `localhost`, and a minimal HTTPS responder. The relay under test trusts the CA through
//! `SSL_CERT_FILE`, as an operator with a private CA would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// Bound on a request's head read by [`serve_https`]: the relay's GETs are far smaller.
const MAX_REQUEST_HEAD: usize = 16 << 10;

/// PEM files of a server: its certificate, its key, and the CA that signed it.
#[derive(Clone)]
pub struct ServerFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and one server certificate, in a temporary directory removed on drop.
pub struct TestCa {
    _dir: TempDir,
    pub files: ServerFiles,
    server_config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new().prefix("gm-relay-tls-").tempdir().expect("temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "gm-relay test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");

        let files = ServerFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
        };
        std::fs::write(&files.ca, ca.pem()).expect("write CA");
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        let key_der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der.into())
            .expect("server TLS config");
        TestCa { _dir: dir, files, server_config: Arc::new(server_config) }
    }
}

/// Serves HTTPS on 127.0.0.1 with `ca`'s server certificate until the runtime ends: each
/// request's path and query go to `answer`, whose `(status, body)` is sent back on a
/// connection then closed. Returns the address and the count of requests answered.
pub async fn serve_https(
    ca: &TestCa,
    answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&ca.server_config));
    let answered = Arc::new(AtomicUsize::new(0));
    let (count, answer) = (Arc::clone(&answered), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count, answer) = (acceptor.clone(), Arc::clone(&count), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split(' ').nth(1).unwrap_or_default();
                let (status, body) = answer(target);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if tls.write_all(reply.as_bytes()).await.is_ok() && tls.shutdown().await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, answered)
}
