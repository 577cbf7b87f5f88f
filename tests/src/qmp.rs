//! A raw QMP client over a unix socket, for tests of a QMP server (`qedstream serve
//! --control`, qemu-storage-daemon): the greeting, commands and their replies, events. Every
//! read waits at most [`DEADLINE`] and then fails the test: a hang is a failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

use crate::served::DEADLINE;

/// A raw QMP connection: greeting, negotiation, replies with their id.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The server's greeting.
    pub greeting: Value,
}

impl Qmp {
    /// Connects and reads the greeting (a read waits at most [`DEADLINE`], then panics).
    pub fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).expect("connecting to the control socket");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
        };
        qmp.greeting = qmp.read().expect("greeting");
        qmp
    }

    /// The next message; `None` when the server closed the connection.
    pub fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("QMP sends JSON")),
            Err(e) => panic!("reading QMP: {e}"),
        }
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("writing QMP");
    }

    /// Sends bytes as they are, returning what the write did (a server may close on us).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads everything until the server closes the connection.
    pub fn read_to_end(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        std::io::Read::read_to_end(&mut self.reader, buf)
    }

    /// Sends `command` and returns the reply (events before it are collected).
    pub fn execute(&mut self, command: Value, events: &mut Vec<Value>) -> Value {
        self.send_raw(format!("{command}\n").as_bytes());
        self.reply(events)
    }

    /// Reads until a reply (events before it are collected).
    pub fn reply(&mut self, events: &mut Vec<Value>) -> Value {
        loop {
            let v = self.read().expect("a reply");
            if v.get("event").is_some() {
                events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Reads events until one named `name`.
    pub fn wait_event(&mut self, name: &str, events: &mut Vec<Value>) -> Value {
        loop {
            let v = self.read().expect("an event");
            events.push(v.clone());
            if v["event"] == name {
                return v;
            }
        }
    }
}

impl Qmp {
    /// Connects and negotiates capabilities (`qmp_capabilities`).
    pub fn negotiated(path: &Path) -> Qmp {
        let mut qmp = Qmp::connect(path);
        let r = qmp.execute(json!({"execute": "qmp_capabilities"}), &mut Vec::new());
        assert_eq!(r, json!({"return": {}}), "qmp_capabilities");
        qmp
    }
}
