//! A minimal HTTP/1.1 keep-alive GET client: one connection per load worker, so the
//! benchmark spends as little of the shared 2 cores as possible on its own side. Handles
//! `Content-Length` and chunked bodies, which is all the relay and nats-server send.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one request on an open connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest reply accepted (a poll answers at most 1,000 entries).
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Spare room made before each read: a send's reply fits many times over.
const READ_CHUNK: usize = 16 * 1024;

pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> Result<HttpConn> {
        let mut conn = HttpConn { addr, stream: None, buf: Vec::with_capacity(8192) };
        conn.open().await?;
        Ok(conn)
    }

    async fn open(&mut self) -> Result<()> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        self.stream = Some(stream);
        Ok(())
    }

    /// `GET path` → (status, body). Reconnects once if the kept-alive connection was closed.
    pub async fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            self.open().await?;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => {
                // A server may close an idle keep-alive connection: retry once on a new one.
                self.stream = None;
                self.open().await?;
                let r = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path)).await;
                match r {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => {
                        self.stream = None;
                        Err(e)
                    }
                    Err(_) => {
                        self.stream = None;
                        bail!("request timed out")
                    }
                }
            }
            Err(_) => {
                self.stream = None;
                bail!("request timed out")
            }
        }
    }

    async fn exchange(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let stream = self.stream.as_mut().context("not connected")?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            read_more(stream, &mut self.buf).await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("reply head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .context("bad status")?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in lines {
            let Some((k, v)) = line.split_once(':') else { continue };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
        let body = if chunked {
            let mut body = Vec::new();
            let mut pos = head_end;
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf[pos..], b"\r\n") {
                        break pos + i;
                    }
                    read_more(stream, &mut self.buf).await?;
                };
                let size_text = std::str::from_utf8(&self.buf[pos..line_end])?;
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
                pos = line_end + 2;
                while self.buf.len() < pos + size + 2 {
                    read_more(stream, &mut self.buf).await?;
                }
                body.extend_from_slice(&self.buf[pos..pos + size]);
                pos += size + 2;
                if size == 0 {
                    break body;
                }
                if body.len() > MAX_REPLY {
                    bail!("reply too large");
                }
            }
        } else {
            let length = length.unwrap_or(0);
            if length > MAX_REPLY {
                bail!("reply too large");
            }
            while self.buf.len() < head_end + length {
                read_more(stream, &mut self.buf).await?;
            }
            self.buf[head_end..head_end + length].to_vec()
        };
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

/// Reads what has arrived into `buf`'s spare capacity: no zeroed scratch buffer per read,
/// which cost the benchmark a 16 KiB `memset` per reply (4% of its CPU at the maximum).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    if buf.len() > MAX_REPLY + READ_CHUNK {
        bail!("reply too large");
    }
    buf.reserve(READ_CHUNK);
    if stream.read_buf(buf).await? == 0 {
        bail!("connection closed");
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A legacy reply's `res` is 1.
pub fn res_ok(body: &[u8]) -> bool {
    body.starts_with(b"{\"res\": 1")
}

/// The `errno` of a legacy reply, if any.
pub fn errno(body: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("errno")?.as_i64()
}
