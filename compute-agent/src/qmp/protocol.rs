//! The QMP wire protocol as pure functions: JSON lines in, typed messages out, and commands
//! encoded with their ids. No sockets here; [`super::client`] moves the bytes.

use serde_json::{Map, Value, json};

/// One line QEMU sent, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The first line of a connection: QEMU's version and offered capabilities.
    Greeting { version: String, capabilities: Vec<String> },
    /// A successful reply to the command with this id.
    Return { id: Option<u64>, value: Value },
    /// A failed reply to the command with this id.
    Error { id: Option<u64>, class: String, description: String },
    /// An asynchronous event.
    Event(Event),
}

/// The QMP events the agent acts on; the rest are kept by name.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A block device hit an I/O error and QEMU applied its error policy (`action`).
    BlockIoError {
        device: String,
        node_name: String,
        operation: String,
        action: String,
        reason: String,
    },
    /// The VM stopped running (an I/O error policy, `stop`, or a pause).
    Stop,
    /// The VM runs again.
    Resume,
    /// `device_del` completed: the guest released the device.
    DeviceDeleted { device: Option<String>, path: String },
    /// The guest powered off or QEMU is quitting.
    Shutdown { guest: bool, reason: String },
    /// Any other event, by name.
    Other { name: String, data: Value },
}

/// A line QEMU sent that is not valid QMP.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed QMP message: {0}")]
pub struct ParseError(pub String);

/// Classifies one line of QMP output.
pub fn parse_message(line: &str) -> Result<Message, ParseError> {
    let value: Value =
        serde_json::from_str(line).map_err(|error| ParseError(format!("{error}: {line:.200}")))?;
    let object =
        value.as_object().ok_or_else(|| ParseError(format!("not an object: {line:.200}")))?;
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(greeting) = object.get("QMP") {
        let version = &greeting["version"]["qemu"];
        let version = format!(
            "{}.{}.{}",
            version["major"].as_u64().unwrap_or(0),
            version["minor"].as_u64().unwrap_or(0),
            version["micro"].as_u64().unwrap_or(0)
        );
        let capabilities = greeting["capabilities"]
            .as_array()
            .map(|list| list.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        return Ok(Message::Greeting { version, capabilities });
    }
    if let Some(value) = object.get("return") {
        return Ok(Message::Return { id, value: value.clone() });
    }
    if let Some(error) = object.get("error") {
        return Ok(Message::Error {
            id,
            class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
            description: error["desc"].as_str().unwrap_or("").to_owned(),
        });
    }
    if let Some(name) = object.get("event").and_then(Value::as_str) {
        let data = object.get("data").cloned().unwrap_or(Value::Object(Map::new()));
        return Ok(Message::Event(parse_event(name, data)));
    }
    Err(ParseError(format!("unknown message: {line:.200}")))
}

fn parse_event(name: &str, data: Value) -> Event {
    let text = |key: &str| data[key].as_str().unwrap_or("").to_owned();
    match name {
        "BLOCK_IO_ERROR" => Event::BlockIoError {
            device: text("device"),
            node_name: text("node-name"),
            operation: text("operation"),
            action: text("action"),
            reason: text("reason"),
        },
        "STOP" => Event::Stop,
        "RESUME" => Event::Resume,
        "DEVICE_DELETED" => Event::DeviceDeleted {
            device: data["device"].as_str().map(str::to_owned),
            path: text("path"),
        },
        "SHUTDOWN" => Event::Shutdown {
            guest: data["guest"].as_bool().unwrap_or(false),
            reason: text("reason"),
        },
        _ => Event::Other { name: name.to_owned(), data },
    }
}

/// Encodes a command with its id as one line (with the newline).
pub fn encode_command(id: u64, command: &str, arguments: Option<&Value>) -> String {
    let mut message = json!({ "execute": command, "id": id });
    if let Some(arguments) = arguments {
        message["arguments"] = arguments.clone();
    }
    let mut line = message.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_kind_of_line() {
        let cases: &[(&str, Message)] = &[
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#,
                Message::Greeting { version: "7.2.22".into(), capabilities: vec!["oob".into()] },
            ),
            (r#"{"return": {}, "id": 7}"#, Message::Return { id: Some(7), value: json!({}) }),
            (
                r#"{"id": 3, "error": {"class": "GenericError", "desc": "Duplicate ID 'x'"}}"#,
                Message::Error {
                    id: Some(3),
                    class: "GenericError".into(),
                    description: "Duplicate ID 'x'".into(),
                },
            ),
            (
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_IO_ERROR", "data": {"device": "", "node-name": "n1", "reason": "Input/output error", "operation": "write", "action": "stop"}}"#,
                Message::Event(Event::BlockIoError {
                    device: "".into(),
                    node_name: "n1".into(),
                    operation: "write".into(),
                    action: "stop".into(),
                    reason: "Input/output error".into(),
                }),
            ),
            (r#"{"event": "STOP", "timestamp": {}}"#, Message::Event(Event::Stop)),
            (r#"{"event": "RESUME", "timestamp": {}}"#, Message::Event(Event::Resume)),
            (
                r#"{"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/machine/peripheral/d0"}}"#,
                Message::Event(Event::DeviceDeleted {
                    device: Some("d0".into()),
                    path: "/machine/peripheral/d0".into(),
                }),
            ),
            (
                r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/d0/virtio-backend"}}"#,
                Message::Event(Event::DeviceDeleted {
                    device: None,
                    path: "/machine/peripheral/d0/virtio-backend".into(),
                }),
            ),
            (
                r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
                Message::Event(Event::Shutdown { guest: true, reason: "guest-shutdown".into() }),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(&parse_message(line).expect(line), expected, "{line}");
        }
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for line in ["", "{", "[]", "42", r#"{"nothing": 1}"#, "\u{0}"] {
            assert!(parse_message(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn commands_are_single_lines_with_ids() {
        let line = encode_command(9, "device_del", Some(&json!({"id": "a\nb"})));
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "JSON escapes embedded newlines");
        let back: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(back, json!({"execute": "device_del", "id": 9, "arguments": {"id": "a\nb"}}));
        let bare: Value = serde_json::from_str(&encode_command(1, "cont", None)).expect("json");
        assert_eq!(bare, json!({"execute": "cont", "id": 1}));
    }
}
