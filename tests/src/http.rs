//! Plain HTTP/1.1 over `std::net`, both ends: the client the API tests talk to tandem-api and
//! tandemd with, and the small server the storage-node stand-ins answer on. One request per
//! connection (`Connection: close`), JSON bodies; enough for tests, and no HTTP crate to pin.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long a client waits for a reply: longer than any synchronous call the services make.
const CLIENT_READ_TIMEOUT_MS: u64 = 60_000;

/// The largest request body the test server reads; a stand-in node never needs more.
const SERVER_BODY_MAX_BYTES: usize = 1 << 20;

/// An HTTP reply: the status, the header block (lowercased), the body as text and parsed as
/// JSON (`Value::Null` when empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub text: String,
    pub body: Value,
}

/// Sends one request with exactly `headers` (plus Host, Connection and Content-Length) and
/// returns the reply. Panics when the server cannot be reached or does not answer in time.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let body = body.unwrap_or("");
    let mut stream = TcpStream::connect(addr)
        .unwrap_or_else(|error| panic!("connecting to {addr} for {method} {path}: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_millis(CLIENT_READ_TIMEOUT_MS)))
        .expect("setting a read timeout");
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream
        .write_all(text.as_bytes())
        .unwrap_or_else(|error| panic!("sending {method} {path} to {addr}: {error}"));
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|error| panic!("reading the reply to {method} {path}: {error}"));
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status,
        headers: headers.to_ascii_lowercase(),
        text: body.to_owned(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

/// [`request`] for the common case: returns (status, JSON body).
pub fn json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let reply = request(addr, method, path, headers, body);
    (reply.status, reply.body)
}

/// A request as the test server hands it to a handler.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The token of an `Authorization: Bearer TOKEN` header, if any.
    pub bearer: Option<String>,
    /// Every header, the name lowercased.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
}

/// Serves `listener` on a thread of its own, one thread per connection, answering each request
/// with `handler`'s (status, JSON body); a `Value::Null` body is sent as no body.
pub fn serve(
    listener: TcpListener,
    handler: impl Fn(&Request) -> (u16, Value) + Send + Sync + 'static,
) {
    let handler = std::sync::Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handler = handler.clone();
            std::thread::spawn(move || serve_one(stream, &*handler));
        }
    });
}

fn serve_one(stream: TcpStream, handler: &dyn Fn(&Request) -> (u16, Value)) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut bearer = None;
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        let Some((name, value)) = header.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse().unwrap_or(0);
        } else if name == "authorization" {
            bearer = value.strip_prefix("Bearer ").map(str::to_owned);
        }
        headers.push((name, value.to_owned()));
    }
    if length > SERVER_BODY_MAX_BYTES {
        return;
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let request = Request {
        method,
        path,
        bearer,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let (status, reply) = handler(&request);
    let text = if reply.is_null() { String::new() } else { reply.to_string() };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}
