//! Both directions of QED interop, over every geometry QEMU handles and three kinds of
//! backing (none, a raw file shorter than the image, a QED image):
//!
//! - QEMU writes (random unaligned `qemu-io write -P` / `write -z`), we read: our bytes equal
//!   `qemu-img convert -O raw`, our map equals `qemu-img map`, our check counters equal
//!   `qemu-img check`.
//! - We write the same kind of random operations, QEMU grades: `qemu-img check` is clean, and
//!   `qemu-img convert` / `qemu-img compare` read back exactly what a byte model says.

use std::path::Path;

use qed::{BackingFormat, CreateOptions, Image};
use qedstream_tests::chain::{self, UnitStatus};
use qedstream_tests::{
    assert_check_agrees, assert_same_bytes, make_backing, open_detached, open_ro, open_rw,
    path_str, qemu, random_ops, read_all, tempdir, BackingKind, Model, TestGeometry, XorShift,
    GEOMETRIES,
};

const BACKINGS: [BackingKind; 3] = [BackingKind::None, BackingKind::RawShort, BackingKind::Qed];

fn seed(g: usize, b: usize, direction: u64) -> u64 {
    0x51ED_0000 + direction * 1000 + g as u64 * 10 + b as u64
}

/// The chain view of ours: the top image and, for a QED backing, the backing image.
fn our_chain_units(top: &Path, backing: Option<&Path>, unit: u64) -> Vec<UnitStatus> {
    let top = open_detached(top).expect("opening top");
    match backing {
        Some(b) => {
            let base = open_detached(b).expect("opening base");
            chain::from_ours(&[&top, &base], unit)
        }
        None => chain::from_ours(&[&top], unit),
    }
}

fn assert_maps_agree(path: &Path, kind: BackingKind, g: &TestGeometry, what: &str) {
    if kind == BackingKind::RawShort {
        // qemu-img map descends into the raw file's own holes; our map stops at "unallocated".
        return;
    }
    let unit = u64::from(g.cluster_size).min(65536);
    let base = path.with_file_name("base.qed");
    let backing = (kind == BackingKind::Qed).then_some(base.as_path());
    let ours = our_chain_units(path, backing, unit);
    let theirs = chain::from_qemu(&qemu::map_json(path), g.size, unit);
    chain::assert_same(&ours, &theirs, unit, what);
}

fn qemu_create(path: &Path, g: &TestGeometry, backing: &qedstream_tests::MadeBacking) {
    let opts = format!(
        "cluster_size={},table_size={}",
        g.cluster_size, g.table_size
    );
    let size = g.size.to_string();
    let mut args = vec!["create", "-f", "qed", "-o", &opts];
    if let (Some(name), Some(fmt)) = (&backing.name, backing.format) {
        args.extend(["-b", name.as_str(), "-F", fmt]);
    }
    args.extend([path_str(path), &size]);
    qemu::img(&args);
}

/// (a) QEMU writes, we read.
fn qemu_writes_we_read(gi: usize) {
    let g = GEOMETRIES[gi];
    for (bi, kind) in BACKINGS.into_iter().enumerate() {
        let what = format!("QEMU-written {g}, backing {kind:?}");
        let dir = tempdir();
        let mut rng = XorShift::new(seed(gi, bi, 1));
        let backing = make_backing(dir.path(), kind, g.size, &mut rng);
        let path = dir.path().join("top.qed");
        qemu_create(&path, &g, &backing);
        let mut model = Model::new(backing.view.clone(), u64::from(g.cluster_size));
        let avoid_bug = kind != BackingKind::None;
        let ops = random_ops(&mut rng, &model, g.ops, g.max_len, avoid_bug);
        qemu::io("qed", &path, &ops);
        for op in &ops {
            model.apply(op);
        }
        let expected = qemu::convert_to_raw(&path);
        // The model agrees with QEMU (so it can grade our writes below).
        assert_same_bytes(&model.bytes, &expected, &format!("{what}: model vs QEMU"));
        let image = open_ro(&path);
        assert_same_bytes(&read_all(&image), &expected, &format!("{what}: our read"));
        // Unaligned reads through the chain, compared with QEMU's bytes.
        for _ in 0..16 {
            let len = 1 + rng.below(g.max_len) as usize;
            let off = rng.below(g.size - len as u64 + 1);
            let mut buf = vec![0u8; len];
            image.read_at(&mut buf, off).unwrap();
            assert_same_bytes(
                &buf,
                &expected[off as usize..off as usize + len],
                &format!("{what}: read {off:#x}+{len:#x}"),
            );
        }
        drop(image);
        assert_maps_agree(&path, kind, &g, &what);
        assert_check_agrees(&path);
        assert_zero_clusters_match_model(&path, &model, &what);
    }
}

fn create_options(g: &TestGeometry, backing: &qedstream_tests::MadeBacking) -> CreateOptions {
    CreateOptions {
        size: g.size,
        cluster_size: g.cluster_size,
        table_size: g.table_size,
        backing: backing.name.clone().map(|n| {
            let format = if backing.format == Some("raw") {
                BackingFormat::Raw
            } else {
                BackingFormat::Probe
            };
            (n, format)
        }),
    }
}

/// (b) We write, QEMU grades.
fn we_write_qemu_grades(gi: usize) {
    let g = GEOMETRIES[gi];
    for (bi, kind) in BACKINGS.into_iter().enumerate() {
        let what = format!("our {g}, backing {kind:?}");
        let dir = tempdir();
        let mut rng = XorShift::new(seed(gi, bi, 2));
        let backing = make_backing(dir.path(), kind, g.size, &mut rng);
        let path = dir.path().join("top.qed");
        Image::create_path(&path, &create_options(&g, &backing)).unwrap();
        let mut model = Model::new(backing.view.clone(), u64::from(g.cluster_size));
        // Our writes follow the spec, so partial writes into zero clusters are fair game.
        let ops = random_ops(&mut rng, &model, g.ops, g.max_len, false);
        let image = open_rw(&path);
        for (i, op) in ops.iter().enumerate() {
            op.apply(&image)
                .unwrap_or_else(|e| panic!("{what}: op {i} {op:?}: {e}"));
            model.apply(op);
        }
        assert_same_bytes(
            &read_all(&image),
            &model.bytes,
            &format!("{what}: our read-back"),
        );
        image.close().unwrap();

        qemu::assert_check_clean(&path);
        let report = assert_check_agrees(&path);
        let data_clusters = model
            .clusters
            .iter()
            .filter(|&&c| c == qedstream_tests::ClusterState::Data)
            .count() as u64;
        assert_eq!(
            report.allocated_clusters, data_clusters,
            "{what}: allocated clusters"
        );
        let flat = qemu::convert_to_raw(&path);
        assert_same_bytes(&flat, &model.bytes, &format!("{what}: qemu-img convert"));
        let expect_raw = dir.path().join("expect.raw");
        std::fs::write(&expect_raw, &model.bytes).unwrap();
        qemu::assert_compare_raw(&path, &expect_raw);
        assert_maps_agree(&path, kind, &g, &what);
        assert_zero_clusters_match_model(&path, &model, &what);
    }
}

/// Our map's top layer says Data/Zero/Unallocated exactly where the model's cluster states do
/// (in particular, cluster-aligned zero writes to unallocated clusters become zero clusters).
fn assert_zero_clusters_match_model(path: &Path, model: &Model, what: &str) {
    use qedstream_tests::ClusterState;
    let image = open_detached(path).unwrap();
    let cs = model.cluster_size;
    for (c, &state) in model.clusters.iter().enumerate() {
        let (m, _) = image
            .mapping_at(qed::GuestOffset(c as u64 * cs), cs)
            .unwrap();
        let got = match m {
            qed::Mapping::Data(_) => ClusterState::Data,
            qed::Mapping::Zero => ClusterState::Zero,
            qed::Mapping::Unallocated => ClusterState::Unallocated,
        };
        assert_eq!(got, state, "{what}: cluster {c} allocation state");
    }
}

macro_rules! per_geometry {
    ($($index:literal => $read:ident, $write:ident;)*) => {$(
        #[test]
        fn $read() {
            qemu_writes_we_read($index);
        }
        #[test]
        fn $write() {
            we_write_qemu_grades($index);
        }
    )*};
}

per_geometry! {
    0 => qemu_writes_we_read_4k_ts2, we_write_qemu_grades_4k_ts2;
    1 => qemu_writes_we_read_4k_ts4, we_write_qemu_grades_4k_ts4;
    2 => qemu_writes_we_read_4k_ts16, we_write_qemu_grades_4k_ts16;
    3 => qemu_writes_we_read_64k_ts2, we_write_qemu_grades_64k_ts2;
    4 => qemu_writes_we_read_64k_ts4, we_write_qemu_grades_64k_ts4;
    5 => qemu_writes_we_read_64k_ts16, we_write_qemu_grades_64k_ts16;
    6 => qemu_writes_we_read_1m_ts2, we_write_qemu_grades_1m_ts2;
    7 => qemu_writes_we_read_1m_ts4, we_write_qemu_grades_1m_ts4;
    8 => qemu_writes_we_read_1m_ts16, we_write_qemu_grades_1m_ts16;
    9 => qemu_writes_we_read_4m_ts2, we_write_qemu_grades_4m_ts2;
}
