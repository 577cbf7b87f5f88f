//! The gate decides about qcow2 layers as about every other: a qcow2 backing outside the
//! confinement directory is refused, and so is a qcow2 image's external data file outside it
//! (the refusal names the data file); inside it, the same chain opens and reads the bytes
//! qemu-img reads. Images are made by qemu-img.

use std::path::Path;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, Error, Gate, GateRefusal};
use qedstream_tests::tempdir;
use qedstream_tests::tools::{ok, qemu_io};

fn confined(root: &Path) -> CorOptions {
    CorOptions {
        gate: Gate {
            confine_to: Some(root.to_path_buf()),
            ..Gate::default()
        },
        copy_on_read: false,
        read_only: true,
    }
}

fn open(top: &Path, root: &Path) -> copy_on_read::Result<CorDevice> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dev = CorDevice::open(top, confined(root)).await?;
        let head = dev.read_at(0, vec![0u8; 4096]).await?;
        assert!(
            head.iter().all(|&b| b == 0x66),
            "wrong bytes through the chain"
        );
        Ok(dev)
    })
}

#[test]
fn confinement_covers_qcow2_backings_and_their_data_files() {
    let dir = tempdir();
    let (root, inside) = (dir.path(), dir.path().join("in"));
    std::fs::create_dir(&inside).unwrap();
    // A qcow2 image inside, its data file outside; and one wholly inside (made from inside:
    // qemu-img resolves a data file name against its working directory).
    ok(
        &inside,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=../out.data",
            "leaky.qcow2",
            "1M",
        ],
    );
    ok(
        &inside,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=ok.data",
            "good.qcow2",
            "1M",
        ],
    );
    ok(
        root,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "outside.qcow2", "1M"],
    );
    for (at, image) in [(&inside, "leaky.qcow2"), (&inside, "good.qcow2")] {
        qemu_io(at, "qcow2", image, &["write -P 0x66 0 64k"]);
    }
    qemu_io(root, "qcow2", "outside.qcow2", &["write -P 0x66 0 64k"]);
    for (top, backing) in [
        ("in/leaky.qed", "leaky.qcow2"),
        ("in/good.qed", "good.qcow2"),
        ("in/out.qed", "../outside.qcow2"),
    ] {
        ok(
            root,
            "qemu-img",
            &[
                "create", "-q", "-f", "qed", "-b", backing, "-F", "qcow2", top,
            ],
        );
    }
    open(&root.join("in/good.qed"), &inside).expect("a chain wholly inside opens");
    match open(&root.join("in/out.qed"), &inside) {
        Err(Error::Gate {
            refusal: GateRefusal::OutsideConfinement(_),
            ..
        }) => {}
        other => panic!("a qcow2 backing outside was not refused: {other:?}"),
    }
    let e = open(&root.join("in/leaky.qed"), &inside).expect_err("data file outside opened");
    let text = e.to_string();
    assert!(
        text.contains("external data file") && text.contains("out.data"),
        "{text}"
    );
    assert!(text.contains("outside the allowed directory"), "{text}");
}
