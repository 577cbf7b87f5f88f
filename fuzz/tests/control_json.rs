//! The `control_json` target on stable: its seeds (every QMP command, a job's whole life, the
//! refusals; built by `qedstream_fuzz::qmp_sessions`, as in `corpus/`) get the replies they
//! should, every prefix and byte-flipped or random sessions pass the target's checks (no
//! panic or hang, QMP lines only, the image checks clean), and the seed files run clean.

use engine::control::fuzzing::{replay_qmp_bytes, Session};
use qedstream_fuzz::qmp_sessions::seeds;

fn replay(data: &[u8]) -> Session {
    replay_qmp_bytes(data).unwrap_or_else(|f| panic!("{f} on {:?}", String::from_utf8_lossy(data)))
}

fn seed(name: &str) -> Vec<u8> {
    seeds().into_iter().find(|s| s.0 == name).expect(name).1
}

#[test]
fn seeds_get_the_replies_they_should() {
    let queries = replay(&seed("queries"));
    assert_eq!((queries.returns, queries.errors), (8, 0), "{queries:?}");
    let stream = replay(&seed("stream"));
    assert_eq!((stream.returns, stream.errors), (3, 0), "{stream:?}");
    let job = replay(&seed("job-control"));
    assert_eq!((job.returns, job.errors), (7, 0), "{job:?}");
    let step = replay(&seed("step"));
    assert_eq!((step.returns, step.errors), (3, 1), "{step:?}");
    // Everything but the one qmp_capabilities is refused.
    let refusals = replay(&seed("refusals"));
    assert_eq!((refusals.returns, refusals.errors), (1, 13), "{refusals:?}");
    let pieces = replay(&seed("one-byte-pieces"));
    assert_eq!((pieces.returns, pieces.errors), (3, 0), "{pieces:?}");
}

#[test]
fn prefixes_and_mutations_pass_the_checks() {
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, bytes) in seeds() {
        for end in (0..bytes.len()).step_by(7) {
            replay(&bytes[..end]);
        }
        for _ in 0..40 {
            let mut v = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % v.len();
                v[at] = next() as u8;
            }
            replay(&v);
        }
    }
}

#[test]
fn every_seed_file_of_the_corpus_runs_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/control_json");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("the control_json corpus") {
        replay(&std::fs::read(entry.unwrap().path()).unwrap());
        files += 1;
    }
    assert!(files >= 6, "the seed corpus is missing ({files} files)");
}

/// A client that sends `prefix`, then `fill` bytes up to `total` bytes in all (never a
/// newline unless `suffix` has one), then `suffix`, then EOF; it counts what the server read.
struct Endless {
    prefix: Vec<u8>,
    fill: u8,
    total: u64,
    suffix: Vec<u8>,
    read: u64,
    sent: Vec<u8>,
}

impl Endless {
    fn new(prefix: &[u8], fill: u8, total: u64, suffix: &[u8]) -> Endless {
        Endless {
            prefix: prefix.to_vec(),
            fill,
            total,
            suffix: suffix.to_vec(),
            read: 0,
            sent: Vec::new(),
        }
    }

    fn byte(&self, at: u64) -> Option<u8> {
        let p = self.prefix.len() as u64;
        if at < p {
            return Some(self.prefix[at as usize]);
        }
        if at < self.total {
            return Some(self.fill);
        }
        self.suffix.get((at - self.total) as usize).copied()
    }
}

impl tokio::io::AsyncRead for Endless {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while buf.remaining() > 0 {
            let Some(b) = self.byte(self.read) else { break };
            buf.put_slice(&[b]);
            self.read += 1;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Endless {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // Keeps the last few replies only.
        if self.sent.len() > 1 << 16 {
            self.sent.clear();
        }
        self.sent.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Serves `client` to its end on a thread of its own; a hang guard of a minute fails the
/// test (the streams are always ready, so the serving loop may never yield to a timer on its
/// own runtime: the guard waits outside it).
fn serve(mut client: Endless) -> Endless {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(engine::control::fuzzing::serve_memory_client(&mut client));
        let _ = done.send(client);
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server neither refused nor drained the input within a minute: hung")
}

const GIB: u64 = 1 << 30;

#[test]
fn a_gigabyte_object_without_a_newline_is_refused_not_buffered() {
    let client = serve(Endless::new(br#"{"execute": ""#, b'a', GIB, b""));
    let bound = (engine::control::socket::MAX_INPUT + 2 * 8192) as u64;
    assert!(
        client.read <= bound,
        "read {} bytes of one unfinished object (bound {bound})",
        client.read
    );
    let last = String::from_utf8_lossy(&client.sent);
    assert!(
        last.trim_end().ends_with(r#"disconnecting"}}"#),
        "no refusal at the end: {last}"
    );
}

#[test]
fn a_long_line_of_garbage_is_dropped_as_it_comes() {
    // 256 MiB of text that is not JSON, without a newline until the end of its line, then a
    // command: the garbage is answered with errors and dropped piece by piece (never
    // buffered, never a disconnect), and the command on the next line is still served.
    let caps = b"\n{\"execute\": \"qmp_capabilities\", \"id\": \"after\"}";
    let client = serve(Endless::new(b"", b'x', 256 << 20, caps));
    assert_eq!(client.read, (256 << 20) + caps.len() as u64);
    let last = String::from_utf8_lossy(&client.sent);
    assert!(
        last.trim_end().ends_with(r#"{"return":{},"id":"after"}"#),
        "the command after the garbage: {last}"
    );
}
