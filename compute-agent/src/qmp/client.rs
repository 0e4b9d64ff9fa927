//! The tokio side of QMP: one Unix socket, a reader task that routes replies to their callers
//! by id and events to subscribers, and a time limit on every call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Semaphore, broadcast, oneshot};

use super::protocol::{Event, Message, encode_command, parse_message};
use crate::constants::{
    QMP_COMMAND_TIMEOUT_MS, QMP_EVENT_QUEUE_MAX, QMP_GREETING_TIMEOUT_MS, QMP_IN_FLIGHT_MAX,
    QMP_LINE_BYTES_MAX,
};

/// Why a QMP call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket I/O: {0}")]
    Io(String),
    #[error("QMP command {command} timed out after {timeout_ms} ms")]
    Timeout { command: String, timeout_ms: u64 },
    /// QEMU refused the command (its `error` reply).
    #[error("QMP command {command} failed: {class}: {description}")]
    Command { command: String, class: String, description: String },
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP connection closed (QEMU exited?)")]
    Disconnected,
}

type Reply = Result<Value, (String, String)>;
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// A connected, capabilities-negotiated QMP monitor.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    // None once the reader saw the connection close: callers then fail at once.
    pending: Pending,
    next_id: AtomicU64,
    in_flight: Semaphore,
    events: broadcast::Sender<Event>,
    version: String,
    reader: tokio::task::JoinHandle<()>,
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|error| QmpError::Io(format!("connecting to {}: {error}", path.display())))?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let greeting = tokio::time::timeout(
            Duration::from_millis(QMP_GREETING_TIMEOUT_MS),
            read_line(&mut reader),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            command: "greeting".into(),
            timeout_ms: QMP_GREETING_TIMEOUT_MS,
        })??
        .ok_or(QmpError::Disconnected)?;
        let version = match parse_message(&greeting) {
            Ok(Message::Greeting { version, .. }) => version,
            other => return Err(QmpError::Protocol(format!("expected a greeting, got {other:?}"))),
        };
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(QMP_EVENT_QUEUE_MAX);
        let reader = tokio::spawn(read_loop(reader, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write_half),
            pending,
            next_id: AtomicU64::new(1),
            in_flight: Semaphore::new(QMP_IN_FLIGHT_MAX),
            events,
            version,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting ("7.2.22").
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A receiver of every event from now on. Subscribe before the command whose event you
    /// await, so the event cannot slip past.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs a command with the default time limit.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, QMP_COMMAND_TIMEOUT_MS).await
    }

    /// Runs a command; its reply must arrive within `timeout_ms`.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout_ms: u64,
    ) -> Result<Value, QmpError> {
        let _permit = self.in_flight.acquire().await.map_err(|_| QmpError::Disconnected)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|poison| poison.into_inner());
            let map = pending.as_mut().ok_or(QmpError::Disconnected)?;
            assert!(map.len() < QMP_IN_FLIGHT_MAX, "the semaphore bounds in-flight commands");
            map.insert(id, sender);
        }
        let line = encode_command(id, command, arguments.as_ref());
        let result = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
            {
                let mut writer = self.writer.lock().await;
                writer
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|error| QmpError::Io(format!("sending {command}: {error}")))?;
            }
            receiver.await.map_err(|_| QmpError::Disconnected)
        })
        .await;
        let reply = match result {
            Ok(reply) => reply,
            Err(_) => {
                self.forget(id);
                return Err(QmpError::Timeout { command: command.into(), timeout_ms });
            }
        };
        if reply.is_err() {
            self.forget(id);
        }
        reply?.map_err(|(class, description)| QmpError::Command {
            command: command.into(),
            class,
            description,
        })
    }

    fn forget(&self, id: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Some(map) = pending.as_mut() {
            map.remove(&id);
        }
    }

    /// True once QEMU closed the monitor.
    pub fn is_closed(&self) -> bool {
        self.pending.lock().unwrap_or_else(|poison| poison.into_inner()).is_none()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads one line, bounded by [`QMP_LINE_BYTES_MAX`]; `None` at end of stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<String>, QmpError> {
    let mut bytes = Vec::new();
    loop {
        let buffer = reader.fill_buf().await.map_err(|error| QmpError::Io(error.to_string()))?;
        if buffer.is_empty() {
            return Ok(None);
        }
        let (take, done) = match buffer.iter().position(|&byte| byte == b'\n') {
            Some(index) => (index + 1, true),
            None => (buffer.len(), false),
        };
        bytes.extend_from_slice(&buffer[..take]);
        reader.consume(take);
        if bytes.len() > QMP_LINE_BYTES_MAX {
            return Err(QmpError::Protocol(format!("line longer than {QMP_LINE_BYTES_MAX} bytes")));
        }
        if done {
            let text = String::from_utf8(bytes)
                .map_err(|_| QmpError::Protocol("line is not UTF-8".into()))?;
            return Ok(Some(text.trim_end().to_owned()));
        }
    }
}

async fn read_loop<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<Event>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => {
                tracing::warn!("QMP read failed: {error}");
                break;
            }
        };
        if line.is_empty() {
            continue;
        }
        let message = match parse_message(&line) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!("{error}");
                continue;
            }
        };
        let (id, reply) = match message {
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, description } => (id, Err((class, description))),
            Message::Event(event) => {
                // No subscriber is not an error: events nobody waits for are dropped.
                let _ = events.send(event);
                continue;
            }
            Message::Greeting { .. } => continue,
        };
        let Some(id) = id else {
            tracing::warn!("QMP reply without an id: {line:.200}");
            continue;
        };
        let sender = pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .as_mut()
            .and_then(|map| map.remove(&id));
        if let Some(sender) = sender {
            let _ = sender.send(reply);
        }
    }
    // Dropping every sender wakes every caller with Disconnected.
    pending.lock().unwrap_or_else(|poison| poison.into_inner()).take();
    let _ = events.send(Event::Other { name: "QMP_DISCONNECTED".into(), data: Value::Null });
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

    /// A scripted QMP server: answers each command by name, out of order when asked to.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read_half, mut write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        write_half.write_all(format!("{GREETING}\n").as_bytes()).await.expect("greeting");
        let mut held: Option<Value> = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let command: Value = serde_json::from_str(&line).expect("client sends JSON");
            let id = command["id"].clone();
            let reply = match command["execute"].as_str().unwrap_or("") {
                "qmp_capabilities" => json!({ "return": {}, "id": id }),
                "slow" => {
                    // Answered only after the next command, to check routing by id.
                    held = Some(json!({ "return": "slow-done", "id": id }));
                    continue;
                }
                "fast" => json!({ "return": "fast-done", "id": id }),
                "fail" => {
                    json!({ "error": { "class": "DeviceNotFound", "desc": "no such device" }, "id": id })
                }
                "emit" => {
                    let event = json!({ "event": "DEVICE_DELETED", "data": { "device": "d1", "path": "/machine/peripheral/d1" }, "timestamp": {} });
                    write_half.write_all(format!("{event}\n").as_bytes()).await.expect("event");
                    json!({ "return": {}, "id": id })
                }
                "never" => continue,
                "quit" => return,
                other => panic!("unexpected command {other}"),
            };
            write_half.write_all(format!("{reply}\n").as_bytes()).await.expect("reply");
            if let Some(held) = held.take() {
                write_half.write_all(format!("{held}\n").as_bytes()).await.expect("held");
            }
        }
    }

    #[tokio::test]
    async fn routes_replies_by_id_types_errors_streams_events_and_times_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_qemu(listener));
        let qmp = Arc::new(Qmp::connect(&path).await.expect("connect"));
        assert_eq!(qmp.version(), "7.2.0");

        let slow = tokio::spawn({
            let qmp = qmp.clone();
            async move { qmp.execute("slow", None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(qmp.execute("fast", None).await.expect("fast"), json!("fast-done"));
        assert_eq!(slow.await.expect("join").expect("slow"), json!("slow-done"));

        match qmp.execute("fail", Some(json!({"id": "x"}))).await {
            Err(QmpError::Command { command, class, description }) => {
                assert_eq!((command.as_str(), class.as_str()), ("fail", "DeviceNotFound"));
                assert_eq!(description, "no such device");
            }
            other => panic!("expected a typed command error, got {other:?}"),
        }

        let mut events = qmp.subscribe();
        qmp.execute("emit", None).await.expect("emit");
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert!(matches!(
            event,
            Ok(Ok(Event::DeviceDeleted { device: Some(ref device), .. })) if device == "d1"
        ));

        match qmp.execute_with_timeout("never", None, 100).await {
            Err(QmpError::Timeout { command, timeout_ms: 100 }) => assert_eq!(command, "never"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        // The connection still works after a timed-out command.
        assert_eq!(qmp.execute("fast", None).await.expect("fast"), json!("fast-done"));

        // QEMU going away fails pending and later calls with Disconnected.
        let result = qmp.execute_with_timeout("quit", None, 2_000).await;
        assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
        server.await.expect("server");
        assert!(qmp.is_closed());
        assert!(matches!(qmp.execute("fast", None).await, Err(QmpError::Disconnected)));
    }

    #[tokio::test]
    async fn a_non_qmp_peer_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("not-qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            stream.write_all(b"{\"hello\": 1}\n").await.expect("write");
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(matches!(Qmp::connect(&path).await, Err(QmpError::Protocol(_))));
    }
}
