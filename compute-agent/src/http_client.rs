//! A small HTTP/1.1 JSON client (plain `http://`) with named timeouts and bounded retries, used
//! for tandem-api and by the CLI for the agent itself.
//!
//! The retry decision is a pure function ([`retry_delay_ms`]); the driver only connects, sends
//! and sleeps. A request is retried only when that cannot do harm: a connection that was never
//! made (nothing was sent) always, a timeout or a 502/503/504 only for idempotent requests.
//! Every error names the method, the URL and the number of attempts; nothing here panics on what
//! a server sends.

use std::fmt;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use crate::constants::HTTP_RESPONSE_BYTES_MAX;

/// Time limits and the retry bound of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// TCP connect limit of one attempt.
    pub connect_timeout_ms: u64,
    /// Limit of one attempt from connect to the last body byte.
    pub request_timeout_ms: u64,
    /// Attempts in all (1 = no retry).
    pub attempts_max: u32,
    /// Wait before the second attempt; doubled each time up to `backoff_ms_max`.
    pub backoff_ms: u64,
    pub backoff_ms_max: u64,
}

impl Policy {
    /// The longest a request can take with every attempt timing out.
    pub const fn worst_case_ms(&self) -> u64 {
        let mut total = 0;
        let mut attempt = 0;
        while attempt < self.attempts_max {
            total += self.request_timeout_ms;
            if attempt + 1 < self.attempts_max {
                total += backoff_ms(self, attempt + 1);
            }
            attempt += 1;
        }
        total
    }
}

/// Whether repeating a request is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// GET, DELETE, and actions the server defines as repeatable.
    Idempotent,
    /// A create: repeated only when it certainly never reached the server.
    NotIdempotent,
}

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection: the request was not sent.
    ConnectFailed,
    /// Sent (perhaps partly) but no complete answer in time, or the connection broke.
    NoAnswer,
    /// An HTTP answer with this status.
    Status(u16),
    /// A failure that repeating cannot mend (a request that cannot be built, an oversized
    /// answer).
    Final,
}

const fn backoff_ms(policy: &Policy, attempts_done: u32) -> u64 {
    // attempts_done >= 1: the first retry waits backoff_ms.
    let mut delay = policy.backoff_ms;
    let mut step = 1;
    while step < attempts_done && delay < policy.backoff_ms_max {
        delay *= 2;
        step += 1;
    }
    if delay > policy.backoff_ms_max { policy.backoff_ms_max } else { delay }
}

/// The wait before another attempt, or `None` to stop (success, a final answer, or the bound).
pub fn retry_delay_ms(
    policy: &Policy,
    idempotency: Idempotency,
    outcome: Outcome,
    attempts_done: u32,
) -> Option<u64> {
    assert!(attempts_done >= 1, "called after an attempt");
    if attempts_done >= policy.attempts_max {
        return None;
    }
    let repeatable = match outcome {
        Outcome::ConnectFailed => true,
        Outcome::NoAnswer => idempotency == Idempotency::Idempotent,
        // Gateway errors and overload: the request was not processed, or can be repeated.
        Outcome::Status(429 | 502 | 503 | 504) => idempotency == Idempotency::Idempotent,
        Outcome::Status(_) | Outcome::Final => false,
    };
    repeatable.then(|| backoff_ms(policy, attempts_done))
}

/// A parsed `http://host:port/base/path` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` (the port defaults to 80).
    pub authority: String,
    /// The path prefix every request path is appended to, without a trailing slash ("" or
    /// "/v3/demo").
    pub base_path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "{url:?}: only http:// is supported ({scheme}:// is not; put a TLS proxy \
                     in front)"
                ));
            }
            None => return Err(format!("{url:?}: use http://HOST:PORT[/PATH]")),
        };
        let (authority, path) = match rest.find('/') {
            Some(index) => rest.split_at(index),
            None => (rest, ""),
        };
        let bad_authority = authority.is_empty()
            || authority.contains('@')
            || !authority.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
        if bad_authority {
            return Err(format!("{url:?}: bad host:port {authority:?}"));
        }
        if path.contains(['?', '#', ' ']) {
            return Err(format!("{url:?}: the path may not carry a query or fragment"));
        }
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (host, after) =
                rest.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after.strip_prefix(':').ok_or_else(|| format!("{url:?}: junk after ']'"))?,
                ),
            };
            (format!("[{host}]"), port)
        } else {
            match authority.split(':').count() {
                1 => (authority.to_owned(), None),
                2 => {
                    let (host, port) = authority.split_once(':').unwrap_or((authority, ""));
                    (host.to_owned(), Some(port))
                }
                _ => return Err(format!("{url:?}: IPv6 addresses need [brackets]")),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(format!("{url:?}: bad host:port {authority:?}"));
        }
        let port = match port {
            Some(port) => port.parse::<u16>().map_err(|_| format!("{url:?}: bad port {port:?}"))?,
            None => 80,
        };
        let authority = format!("{host}:{port}");
        Ok(Endpoint { authority, base_path: path.trim_end_matches('/').to_owned() })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.base_path)
    }
}

/// What went wrong with a request, with where and how often it was tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method} {url}: {kind} ({attempts} attempt{plural})", plural = if *.attempts == 1 { "" } else { "s" })]
pub struct HttpError {
    pub method: String,
    pub url: String,
    pub attempts: u32,
    pub kind: HttpErrorKind,
}

/// The kind of an [`HttpError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// The request could not be built (a bad header value or path).
    Request(String),
    /// No TCP connection (refused, unreachable, or no answer within the connect limit).
    Connect(String),
    /// No complete answer within the request limit.
    Timeout { timeout_ms: u64 },
    /// The connection broke or the answer was not HTTP.
    Transport(String),
    /// The body was larger than [`HTTP_RESPONSE_BYTES_MAX`].
    TooLarge,
}

impl fmt::Display for HttpErrorKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpErrorKind::Request(reason) => write!(formatter, "bad request: {reason}"),
            HttpErrorKind::Connect(reason) => write!(formatter, "cannot connect: {reason}"),
            HttpErrorKind::Timeout { timeout_ms } => {
                write!(formatter, "no answer within {timeout_ms} ms")
            }
            HttpErrorKind::Transport(reason) => write!(formatter, "transport: {reason}"),
            HttpErrorKind::TooLarge => {
                write!(formatter, "answer larger than {HTTP_RESPONSE_BYTES_MAX} bytes")
            }
        }
    }
}

/// A received answer: the status and the body as JSON (`Null` when empty, a JSON string when
/// the body is not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client for one endpoint.
#[derive(Debug, Clone)]
pub struct HttpClient {
    endpoint: Endpoint,
    policy: Policy,
    /// Sent with every request (e.g. the auth token), besides the JSON content headers.
    headers: Vec<(String, String)>,
}

impl HttpClient {
    pub fn new(endpoint: Endpoint, policy: Policy, headers: Vec<(String, String)>) -> HttpClient {
        assert!(policy.attempts_max >= 1);
        HttpClient { endpoint, policy, headers }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `method path` (appended to the endpoint's base path) with an optional JSON body,
    /// retrying as [`retry_delay_ms`] allows. Any HTTP status is an `Ok` answer.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        idempotency: Idempotency,
    ) -> Result<Response, HttpError> {
        let url = self.endpoint.url(path);
        let full_path = format!("{}{path}", self.endpoint.base_path);
        let payload = body.map(Value::to_string).unwrap_or_default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = self.attempt(method, &full_path, &payload).await;
            let outcome = match &result {
                Ok(response) => Outcome::Status(response.status),
                Err(HttpErrorKind::Connect(_)) => Outcome::ConnectFailed,
                Err(HttpErrorKind::Request(_) | HttpErrorKind::TooLarge) => Outcome::Final,
                Err(HttpErrorKind::Timeout { .. } | HttpErrorKind::Transport(_)) => {
                    Outcome::NoAnswer
                }
            };
            match retry_delay_ms(&self.policy, idempotency, outcome, attempts) {
                Some(delay_ms) => {
                    tracing::debug!("{method} {url}: {outcome:?}; retrying in {delay_ms} ms");
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                None => {
                    return result.map_err(|kind| HttpError {
                        method: method.to_owned(),
                        url: url.clone(),
                        attempts,
                        kind,
                    });
                }
            }
        }
    }

    async fn attempt(
        &self,
        method: &str,
        full_path: &str,
        payload: &str,
    ) -> Result<Response, HttpErrorKind> {
        let authority = &self.endpoint.authority;
        let request_timeout_ms = self.policy.request_timeout_ms;
        let exchange = async {
            let connect = tokio::net::TcpStream::connect(authority.as_str());
            let stream = tokio::time::timeout(
                Duration::from_millis(self.policy.connect_timeout_ms),
                connect,
            )
            .await
            .map_err(|_| {
                HttpErrorKind::Connect(format!(
                    "{authority}: no connection within {} ms",
                    self.policy.connect_timeout_ms
                ))
            })?
            .map_err(|error| HttpErrorKind::Connect(format!("{authority}: {error}")))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|error| HttpErrorKind::Transport(error.to_string()))?;
            // The connection task ends with this attempt, whichever way it ends (a timed-out
            // attempt must not leave a task holding a socket to a silent server).
            let _driver = AbortOnDrop(tokio::spawn(connection));
            let mut builder = hyper::Request::builder()
                .method(method)
                .uri(if full_path.is_empty() { "/" } else { full_path })
                .header("host", authority.as_str())
                .header("accept", "application/json");
            if !payload.is_empty() {
                builder = builder.header("content-type", "application/json");
            }
            for (name, value) in &self.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            let request = builder
                .body(http_body_util::Full::new(hyper::body::Bytes::from(payload.to_owned())))
                .map_err(|error| HttpErrorKind::Request(error.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|error| HttpErrorKind::Transport(error.to_string()))?;
            let status = response.status().as_u16();
            let limited =
                http_body_util::Limited::new(response.into_body(), HTTP_RESPONSE_BYTES_MAX);
            let bytes = match limited.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    return Err(HttpErrorKind::TooLarge);
                }
                Err(error) => return Err(HttpErrorKind::Transport(error.to_string())),
            };
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            };
            Ok(Response { status, body })
        };
        tokio::time::timeout(Duration::from_millis(request_timeout_ms), exchange)
            .await
            .map_err(|_| HttpErrorKind::Timeout { timeout_ms: request_timeout_ms })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        connect_timeout_ms: 100,
        request_timeout_ms: 1_000,
        attempts_max: 4,
        backoff_ms: 100,
        backoff_ms_max: 250,
    };

    #[test]
    fn retries_only_what_is_safe_and_stop_at_the_bound() {
        use Idempotency::{Idempotent as I, NotIdempotent as N};
        use Outcome::{ConnectFailed, NoAnswer, Status};
        let cases: &[(Idempotency, Outcome, u32, Option<u64>)] = &[
            (I, Status(200), 1, None),
            (I, Status(404), 1, None),
            (I, Status(500), 1, None),
            (I, Status(503), 1, Some(100)),
            (N, Status(503), 1, None),
            (I, NoAnswer, 1, Some(100)),
            (N, NoAnswer, 1, None),
            (N, ConnectFailed, 1, Some(100)),
            (N, ConnectFailed, 2, Some(200)),
            (N, ConnectFailed, 3, Some(250)),
            (N, ConnectFailed, 4, None),
            (I, Status(502), 4, None),
        ];
        for (idempotency, outcome, done, expected) in cases {
            assert_eq!(
                retry_delay_ms(&POLICY, *idempotency, *outcome, *done),
                *expected,
                "{idempotency:?} {outcome:?} after {done}"
            );
        }
        assert_eq!(POLICY.worst_case_ms(), 4 * 1_000 + 100 + 200 + 250);
        let once = Policy { attempts_max: 1, ..POLICY };
        assert_eq!(retry_delay_ms(&once, Idempotency::Idempotent, Outcome::ConnectFailed, 1), None);
        assert_eq!(once.worst_case_ms(), 1_000);
    }

    #[test]
    fn endpoints() {
        let ok = [
            ("http://127.0.0.1:8776/v3/demo", "127.0.0.1:8776", "/v3/demo"),
            ("http://api.example:8776/v3/demo/", "api.example:8776", "/v3/demo"),
            ("http://api.example", "api.example:80", ""),
            ("http://[::1]:8776", "[::1]:8776", ""),
            ("http://[::1]/v3", "[::1]:80", "/v3"),
        ];
        for (url, authority, base) in ok {
            let endpoint = Endpoint::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"));
            assert_eq!(
                (endpoint.authority.as_str(), endpoint.base_path.as_str()),
                (authority, base)
            );
        }
        assert_eq!(
            Endpoint::parse("http://h:1/v3/p").map(|e| e.url("/volumes")).as_deref(),
            Ok("http://h:1/v3/p/volumes")
        );
        let bad = [
            ("https://h/v3", "only http"),
            ("h:8776", "use http://"),
            ("http:///v3", "bad host"),
            ("http://u:p@h/v3", "bad host"),
            ("http://h:99999", "bad port"),
            ("http://::1:8776", "brackets"),
            ("http://h/v3?x=1", "query"),
        ];
        for (url, needle) in bad {
            let error = Endpoint::parse(url).expect_err(url);
            assert!(error.contains(needle), "{url}: {error}");
        }
    }

    #[test]
    fn an_unreachable_server_is_an_error_with_context_after_bounded_attempts() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}/v3/p")).unwrap();
        let policy = Policy { attempts_max: 3, backoff_ms: 1, backoff_ms_max: 2, ..POLICY };
        let client = HttpClient::new(endpoint, policy, vec![]);
        let error = runtime
            .block_on(client.send("POST", "/attachments", None, Idempotency::NotIdempotent))
            .expect_err("nothing listens");
        assert_eq!(error.attempts, 3, "connect failures are retried up to the bound");
        assert!(matches!(error.kind, HttpErrorKind::Connect(_)));
        let text = error.to_string();
        assert!(text.contains(&format!("POST http://127.0.0.1:{port}/v3/p/attachments")), "{text}");
        assert!(text.contains("3 attempts"), "{text}");
    }

    #[test]
    fn a_silent_server_times_out_and_garbage_is_not_a_panic() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // Accepts and never answers.
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let silent_port = silent.local_addr().unwrap().port();
            let _keep = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = silent.accept().await {
                    held.push(stream);
                }
            });
            let policy = Policy {
                request_timeout_ms: 200,
                attempts_max: 2,
                backoff_ms: 1,
                backoff_ms_max: 1,
                ..POLICY
            };
            let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{silent_port}")).unwrap();
            let client = HttpClient::new(endpoint, policy, vec![]);
            let error = client.send("GET", "/x", None, Idempotency::Idempotent).await.unwrap_err();
            assert_eq!(error.kind, HttpErrorKind::Timeout { timeout_ms: 200 });
            assert_eq!(error.attempts, 2);
            let error =
                client.send("POST", "/x", None, Idempotency::NotIdempotent).await.unwrap_err();
            assert_eq!(error.attempts, 1, "a create that may have arrived is not repeated");

            // Answers garbage.
            let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let garbage_port = garbage.local_addr().unwrap().port();
            let _serve = tokio::spawn(async move {
                while let Ok((mut stream, _)) = garbage.accept().await {
                    use tokio::io::AsyncWriteExt;
                    let _ = stream.write_all(b"SSH-2.0-not-http\r\n\r\n").await;
                }
            });
            let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{garbage_port}")).unwrap();
            let client = HttpClient::new(endpoint, policy, vec![]);
            let error = client.send("GET", "/", None, Idempotency::Idempotent).await.unwrap_err();
            assert!(matches!(error.kind, HttpErrorKind::Transport(_)), "{error}");
        });
    }
}
