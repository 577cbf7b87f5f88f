//! `qedstream serve --vhost-user-blk` driven by a front end in the test process
//! (`tests::vhost_front`: guest memory, split virtqueues, the virtio-blk driver), with no guest
//! to boot: requests in flight on two queues at once, reads of the whole disk through the
//! copy-on-read path, writes and a flush that land in the image, a second front end after the
//! first one left. The same driver against qemu-storage-daemon's vhost-user-blk export of the
//! same image reads the same bytes, which proves the driver as much as the server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qedstream_tests::served::Served;
use qedstream_tests::vhost_front::{BlkRequest, VhostFront};
use qedstream_tests::{assert_same_bytes, tempdir, tools, vm_serve};

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;
/// Bytes per request slot.
const SLOT: u32 = 256 * 1024;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qedstream"))
}

/// Reads the whole disk with `depth` requests in flight on each of `queues` queues (request
/// `i` goes to queue `i % queues`); returns the bytes.
fn read_all(front: &mut VhostFront, queues: u16, depth: u16) -> Vec<u8> {
    let size = front.capacity();
    let mut out = vec![0u8; size as usize];
    let mut next = 0u64;
    let mut slots: Vec<Vec<Option<u64>>> = vec![vec![None; depth as usize]; queues as usize];
    let mut outstanding = 0usize;
    loop {
        for q in 0..queues {
            for s in 0..depth {
                if slots[q as usize][s as usize].is_none() && next < size {
                    let len = (size - next).min(u64::from(SLOT)) as u32;
                    front
                        .submit(q, s, BlkRequest::Read { offset: next, len })
                        .unwrap();
                    slots[q as usize][s as usize] = Some(next);
                    next += u64::from(len);
                    outstanding += 1;
                }
            }
        }
        if outstanding == 0 {
            return out;
        }
        for q in 0..queues {
            for done in front.reap(q).unwrap() {
                assert_eq!(done.status, 0, "read on queue {q}: {done:?}");
                let offset = slots[q as usize][done.slot as usize].take().unwrap();
                let len = (size - offset).min(u64::from(SLOT)) as u32;
                let data = front.slot_data(q, done.slot, len).unwrap();
                out[offset as usize..offset as usize + len as usize].copy_from_slice(&data);
                outstanding -= 1;
            }
        }
        std::thread::yield_now();
    }
}

/// `qedstream serve --output=json --vhost-user-blk dir/vhost.sock ARGS... IMAGE`.
fn serve(dir: &Path, args: &[&str], image: &str) -> (Served, PathBuf) {
    let sock = dir.join("vhost.sock");
    let sock_arg = sock.display().to_string();
    let mut all = vec!["--vhost-user-blk", &sock_arg];
    all.extend_from_slice(args);
    all.push(image);
    (Served::start(bin(), dir, &all), sock)
}

/// Two queues, 8 requests in flight on each, read the base through the empty overlay (every
/// read a copy-on-read); unaligned-to-cluster writes and a flush land; a second front end
/// sees them; the image ends clean and equal to what was written.
#[test]
fn requests_on_two_queues_read_the_base_and_writes_land() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = vm_serve::random_base(d, DISK, 0xF0_0001);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let (mut served, sock) = serve(d, &["--num-queues", "2"], "top.qed");

    let mut front = VhostFront::connect(&sock, 2, 8, SLOT).unwrap();
    assert_eq!(front.capacity(), DISK);
    let seen = read_all(&mut front, 2, 8);
    assert_same_bytes(&seen, &expected, "the base through the overlay");

    let patch: Vec<u8> = (0..3 * 4096 + 512).map(|i| (i % 251) as u8).collect();
    let at = 3 * MIB - 4096; // across a cluster boundary
    front.write_at(1, at, &patch).unwrap();
    front.flush(1).unwrap();
    expected[at as usize..at as usize + patch.len()].copy_from_slice(&patch);
    drop(front);

    let mut again = VhostFront::connect(&sock, 1, 4, SLOT).unwrap();
    let back = again.read_at(0, at, patch.len() as u32).unwrap();
    assert_same_bytes(&back, &patch, "a second front end reads the write back");
    drop(again);

    assert_eq!(served.terminate(), 0);
    let stats = served.wait_for("vhost-user-blk");
    assert_eq!(stats["front-ends"], 2, "{stats}");
    let queues = stats["queues"].as_array().unwrap();
    let per_queue: Vec<u64> = queues
        .iter()
        .map(|q| q["requests"].as_u64().unwrap())
        .collect();
    let reads = DISK / u64::from(SLOT);
    assert_eq!(per_queue.iter().sum::<u64>(), reads + 3, "{stats}");
    assert!(per_queue.iter().all(|n| *n > 0), "{stats}");
    vm_serve::assert_clean_with(d, "top.qed", &expected, "after the front end's writes");
}

/// A qemu-storage-daemon export, killed on drop.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-storage-daemon exporting `dir/image` (QED over its backing) as a vhost-user-blk
/// device on `dir/qsd.sock`; waits for the socket.
fn qsd_export(dir: &Path, image: &str) -> (Qsd, PathBuf) {
    let sock = dir.join("qsd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.current_dir(dir)
        .args([
            "--blockdev",
            &format!("driver=file,filename={image},node-name=file0"),
            "--blockdev",
            "driver=qed,file=file0,node-name=disk0",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock.display()
            ),
        ])
        .stdin(Stdio::null());
    let child = tools::spawn(&mut cmd).expect("qemu-storage-daemon must be installed");
    let qsd = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (qsd, sock)
}

/// The driver against QEMU's own server: the same bytes, and a write read back.
#[test]
fn the_front_end_reads_the_same_bytes_from_qemu_storage_daemon() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0xF0_0002);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let (qsd, sock) = qsd_export(d, "top.qed");

    let mut front = VhostFront::connect(&sock, 2, 8, SLOT).unwrap();
    assert_eq!(front.capacity(), DISK);
    let seen = read_all(&mut front, 2, 8);
    assert_same_bytes(&seen, &base, "the base through QSD's export");
    front.write_at(0, MIB, &[0x5a; 4096]).unwrap();
    let back = front.read_at(1, MIB, 4096).unwrap();
    assert_same_bytes(&back, &[0x5a; 4096], "QSD reads the write back");
    drop(front);
    drop(qsd);
}
