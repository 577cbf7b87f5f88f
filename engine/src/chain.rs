//! A backing chain opened layer by layer for inspection: `info` and `map` walk it the way
//! `qemu-img info --backing-chain` and `qemu-img map` do.
//!
//! Every layer below the top is opened by the one chain opener, [`Gate::open_chain`]: each
//! file admitted by the shared rules (opened once, confinement on the opened file, loops by
//! identity, depth bound, probe policy). A QED layer never opens its own backing: the chain,
//! not the image, decides where unallocated ranges come from.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use copy_on_read::gate::OpenedLayer;
use copy_on_read::qcow2::Qcow2Mapping;
use copy_on_read::{BlockDevice, Gate, NbdExport, Qcow2, RawFile};
use qed::backing::probe_storage;
use qed::{BackingFormat, Image, Mapping, OpenOptions, Storage};

use crate::error::{Error, Result};

/// One layer of a chain.
#[derive(Debug)]
pub enum Layer {
    /// A QED image (its backing is the next layer, opened by the gate).
    Qed(Box<Image>),
    /// An NBD export (read as raw), driven by the chain's runtime.
    Nbd(Box<NbdExport>),
    /// A raw file (its size is its length rounded up to 512).
    Raw(RawFile),
    /// A qcow2 image (read-only; its backing is the next layer, opened by the gate).
    Qcow2(Box<Qcow2>),
}

/// A layer and the name it was opened by.
#[derive(Debug)]
pub struct ChainLayer {
    /// The layer.
    pub layer: Layer,
    /// The path it was opened from.
    pub path: PathBuf,
    /// The name as the layer above stored it (the top's is its path as given).
    pub name: String,
}

impl ChainLayer {
    /// The layer's virtual size.
    pub fn size(&self) -> u64 {
        match &self.layer {
            Layer::Qed(image) => image.size(),
            Layer::Raw(raw) => raw.size(),
            Layer::Nbd(export) => export.size(),
            Layer::Qcow2(image) => image.size(),
        }
    }

    /// `"qed"`, `"qcow2"` or `"raw"` (an NBD export reads as raw).
    pub fn format(&self) -> &'static str {
        match &self.layer {
            Layer::Qed(_) => "qed",
            Layer::Qcow2(_) => "qcow2",
            Layer::Raw(_) | Layer::Nbd(_) => "raw",
        }
    }
}

/// A chain of layers, top first.
#[derive(Debug)]
pub struct Chain {
    /// Top first.
    pub layers: Vec<ChainLayer>,
    /// Drives the NBD layers' clients.
    runtime: tokio::runtime::Runtime,
}

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer answers (0 = top).
    pub depth: u32,
    /// Some layer has it (data or zero).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored data.
    pub data: bool,
    /// A compressed qcow2 cluster (no offset is given for it, as in qemu-img).
    pub compressed: bool,
    /// Where it is stored in that layer's file, when known.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// The JSON object qemu-img prints for this extent.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("start".into(), json!(self.start));
        m.insert("length".into(), json!(self.length));
        m.insert("depth".into(), json!(self.depth));
        m.insert("present".into(), json!(self.present));
        m.insert("zero".into(), json!(self.zero));
        m.insert("data".into(), json!(self.data));
        m.insert("compressed".into(), json!(self.compressed));
        if let Some(o) = self.offset {
            m.insert("offset".into(), json!(o));
        }
        Value::Object(m)
    }

    /// The line `qemu-img map --output=json` prints for this extent, spelled the same way.
    pub fn to_qemu_json_line(&self) -> String {
        let mut line = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            line.push_str(&format!(", \"offset\": {o}"));
        }
        line.push('}');
        line
    }

    /// An extent of a raw layer (a file or an NBD export): always present, its offset in the
    /// layer is the guest offset, data or a hole.
    fn raw(start: u64, length: u64, depth: u32, data: bool) -> MapEntry {
        MapEntry {
            start,
            length,
            depth,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(start),
        }
    }

    fn extends(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Opens the top of a chain (a file as raw or QED by its first bytes, or an NBD URI).
fn open_top_layer(
    path: &Path,
    format: BackingFormat,
    gate: &Gate,
    runtime: &tokio::runtime::Runtime,
) -> Result<ChainLayer> {
    let access = gate.read_access();
    let io = gate.io;
    let name = path.display().to_string();
    if crate::source::is_nbd_name(path) {
        let uri = path.to_string_lossy().into_owned();
        let export = runtime
            .block_on(NbdExport::connect(&uri, Default::default()))
            .map_err(Error::device)?;
        return Ok(ChainLayer {
            layer: Layer::Nbd(Box::new(export)),
            path: path.to_path_buf(),
            name,
        });
    }
    let file = qed::file::open(path, access).map_err(|e| Error::image(path, e))?;
    let detected = probe_storage(&file).map_err(|e| Error::open(path, e))?;
    let layer = if format == BackingFormat::Raw || detected == "raw" {
        Layer::Raw(
            RawFile::from_file_with(file, path.to_path_buf(), false, io).map_err(Error::device)?,
        )
    } else if detected == "qed" {
        let options = OpenOptions {
            read_only: true,
            force_share: access == qed::Access::SharedRead,
            path: Some(path.to_path_buf()),
            ..OpenOptions::default()
        };
        let storage = io.storage(file).map_err(|e| Error::open(path, e))?;
        Layer::Qed(Box::new(
            Image::open(storage, options).map_err(|e| Error::image(path, e))?,
        ))
    } else if detected == "qcow2" {
        match runtime
            .block_on(gate.open_qcow2_top(file, path))
            .map_err(Error::device)?
        {
            OpenedLayer::Qcow2 { image, .. } => Layer::Qcow2(image),
            // `open_qcow2_top` opens qcow2 layers only; anything else is refused, not trusted.
            _ => {
                return Err(Error::UnsupportedFormat {
                    path: Some(path.to_path_buf()),
                    format: detected.to_string(),
                    supported: "qed, qcow2 or raw",
                })
            }
        }
    } else {
        return Err(Error::UnsupportedFormat {
            path: Some(path.to_path_buf()),
            format: detected.to_string(),
            supported: "qed, qcow2 or raw",
        });
    };
    Ok(ChainLayer {
        layer,
        path: path.to_path_buf(),
        name,
    })
}

impl Chain {
    /// Opens `path` (QED, or raw when `format` says so or it is not QED) alone, as plain
    /// `qemu-img info` does: its backing is named, never opened.
    pub fn open_top(path: &Path, format: Option<&str>, gate: &Gate) -> Result<Chain> {
        Chain::open_layers(path, format, gate, false)
    }

    /// Opens `path` (QED, or raw when `format` says so or it is not QED) and every backing
    /// below it through `gate`.
    pub fn open(path: &Path, format: Option<&str>, gate: &Gate) -> Result<Chain> {
        Chain::open_layers(path, format, gate, true)
    }

    fn open_layers(
        path: &Path,
        format: Option<&str>,
        gate: &Gate,
        whole_chain: bool,
    ) -> Result<Chain> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io("starting the I/O runtime"))?;
        let (top_format, expected) = match format {
            Some("raw") => (BackingFormat::Raw, None),
            Some("qed") => (BackingFormat::Probe, Some("QED")),
            Some("qcow2") => (BackingFormat::Probe, Some("qcow2")),
            None => (BackingFormat::Probe, None),
            Some(other) => {
                return Err(Error::UnsupportedFormat {
                    path: None,
                    format: other.to_string(),
                    supported: "qed, qcow2 or raw",
                })
            }
        };
        let top = open_top_layer(path, top_format, gate, &runtime)?;
        if let Some(expected) = expected {
            if !top.format().eq_ignore_ascii_case(expected) {
                return Err(Error::FormatMismatch {
                    path: path.to_path_buf(),
                    expected,
                    found: top.format(),
                });
            }
        }
        let below = match (&top.layer, whole_chain) {
            (Layer::Qed(image), true) => runtime
                .block_on(gate.open_chain(image, path, 0))
                .map_err(Error::device)?,
            (Layer::Qcow2(image), true) => runtime
                .block_on(gate.open_chain_of_qcow2(image, path, 0))
                .map_err(Error::device)?,
            _ => Vec::new(),
        };
        let mut layers = vec![top];
        for opened in below {
            // The name as the layer above stores it.
            let name = match &layers.last().map(|l| &l.layer) {
                Some(Layer::Qed(image)) => image.backing_name().unwrap_or_default(),
                Some(Layer::Qcow2(image)) => {
                    image.header().backing_name.clone().unwrap_or_default()
                }
                _ => String::new(),
            };
            let (layer, path) = match opened {
                OpenedLayer::Raw { raw, path } => (Layer::Raw(raw), path),
                OpenedLayer::Qed { image, path } => (Layer::Qed(image), path),
                OpenedLayer::Qcow2 { image, path } => (Layer::Qcow2(image), path),
                OpenedLayer::Nbd { export } => (Layer::Nbd(Box::new(export)), PathBuf::from(&name)),
            };
            layers.push(ChainLayer { layer, path, name });
        }
        Ok(Chain { layers, runtime })
    }

    /// The top layer.
    pub fn top(&self) -> &ChainLayer {
        &self.layers[0]
    }

    /// `qemu-img map --output=json` extents for the whole virtual disk.
    pub fn map(&self) -> Result<Vec<MapEntry>> {
        let size = self.top().size();
        let mut out: Vec<MapEntry> = Vec::new();
        let mut pos = 0;
        // The last block-status answer of an NBD layer: one request answers for many extents.
        let mut status = Vec::new();
        while pos < size {
            let e = self.map_at(pos, size - pos, &mut status)?;
            pos += e.length;
            match out.last_mut() {
                Some(last) if last.extends(&e) => last.length += e.length,
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// The extent at `pos`, as far as one answer reaches (at most `max`).
    fn map_at(
        &self,
        pos: u64,
        max: u64,
        status: &mut Vec<copy_on_read::StatusExtent>,
    ) -> Result<MapEntry> {
        let mut len = max;
        for (depth, cl) in self.layers.iter().enumerate() {
            let depth = depth as u32;
            if depth > 0 && pos >= cl.size() {
                return Ok(MapEntry {
                    start: pos,
                    length: len,
                    depth: depth - 1,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                });
            }
            if depth > 0 {
                len = len.min(cl.size() - pos);
            }
            match &cl.layer {
                Layer::Qed(image) => {
                    let (mapping, n) = image
                        .mapping_at(qed::GuestOffset(pos), len)
                        .map_err(|e| Error::image(&cl.path, e))?;
                    len = n;
                    match mapping {
                        Mapping::Data(host) => {
                            return Ok(MapEntry {
                                start: pos,
                                length: len,
                                depth,
                                present: true,
                                zero: false,
                                data: true,
                                compressed: false,
                                offset: Some(host.0),
                            })
                        }
                        Mapping::Zero => {
                            return Ok(MapEntry {
                                start: pos,
                                length: len,
                                depth,
                                present: true,
                                zero: true,
                                data: false,
                                compressed: false,
                                offset: None,
                            })
                        }
                        Mapping::Unallocated => {}
                    }
                }
                Layer::Nbd(export) => {
                    let covers = |s: &[copy_on_read::StatusExtent]| {
                        s.iter()
                            .any(|e| e.offset <= pos && pos < e.offset + e.length)
                    };
                    if !covers(status) {
                        // Ask as far as the export goes: the answer covers a prefix.
                        let rest = cl.size() - pos;
                        *status = self
                            .runtime
                            .block_on(export.block_status(pos, rest))
                            .map_err(Error::device)?;
                    }
                    let (data, n) = status
                        .iter()
                        .find(|e| e.offset <= pos && pos < e.offset + e.length)
                        .map(|e| {
                            (
                                e.status == copy_on_read::Status::Data,
                                (e.offset + e.length).saturating_sub(pos).clamp(1, len),
                            )
                        })
                        .unwrap_or((true, len));
                    return Ok(MapEntry::raw(pos, n, depth, data));
                }
                Layer::Raw(raw) => {
                    let (data, n) = raw_extent(raw.file(), pos, len);
                    return Ok(MapEntry::raw(pos, n, depth, data));
                }
                Layer::Qcow2(image) => {
                    let (mapping, n) = image
                        .mapping_at(pos, len)
                        .map_err(|e| qcow2_error(&cl.path, e))?;
                    len = n;
                    if let Some(e) = qcow2_entry(mapping, pos, len, depth) {
                        return Ok(e);
                    }
                }
            }
        }
        let bottom = (self.layers.len() - 1) as u32;
        Ok(MapEntry {
            start: pos,
            length: len,
            depth: bottom,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        })
    }
}

/// A qcow2 layer's error, naming its file.
fn qcow2_error(path: &Path, source: copy_on_read::qcow2::Qcow2Error) -> Error {
    Error::device(copy_on_read::Error::Qcow2 {
        path: path.display().to_string(),
        source,
    })
}

/// The map entry of a qcow2 layer's extent, or `None` where it is unallocated (the layer
/// below answers). As qemu-img: a compressed cluster has no offset.
fn qcow2_entry(mapping: Qcow2Mapping, start: u64, length: u64, depth: u32) -> Option<MapEntry> {
    let (zero, compressed, offset) = match mapping {
        Qcow2Mapping::Unallocated => return None,
        Qcow2Mapping::Data { host_offset } => (false, false, Some(host_offset)),
        Qcow2Mapping::Compressed => (false, true, None),
        Qcow2Mapping::Zero => (true, false, None),
    };
    Some(MapEntry {
        start,
        length,
        depth,
        present: true,
        zero,
        data: !zero,
        compressed,
        offset,
    })
}

/// Whether `pos` of a raw file is data or a hole, and how far that lasts (SEEK_DATA /
/// SEEK_HOLE; without them, all data).
pub fn raw_extent(file: &File, pos: u64, max: u64) -> (bool, u64) {
    let fd = file.as_raw_fd();
    let Ok(off) = libc::off_t::try_from(pos) else {
        return (true, max);
    };
    // SAFETY: lseek repositions the offset of a descriptor `file` owns for this call; no
    // memory is shared with the kernel and all other I/O on it is positioned.
    let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if data < 0 {
        let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        // ENXIO: no data at or after pos (a hole up to EOF). Otherwise: unknown, say data.
        return (!enxio, max);
    }
    let data = data as u64;
    if data > pos {
        return (false, (data - pos).min(max));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
    if hole < 0 {
        return (true, max);
    }
    let hole = hole as u64;
    // The file's end is a hole; QEMU rounds the size up to 512, so data lasts to there.
    let end = if hole >= Storage::len(file).unwrap_or(hole) {
        hole.div_ceil(512) * 512
    } else {
        hole
    };
    (true, end.saturating_sub(pos).clamp(1, max))
}

/// Bytes the file takes on disk (`st_blocks * 512`), as qemu-img's `actual-size`.
pub fn actual_size(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// `qemu-img info --output=json` for one layer of `chain` (its backing named, not nested).
pub fn info_json(chain: &Chain, index: usize) -> Value {
    let cl = &chain.layers[index];
    let mut m = Map::new();
    m.insert("filename".into(), json!(cl.name));
    m.insert("format".into(), json!(cl.format()));
    m.insert("virtual-size".into(), json!(cl.size()));
    match &cl.layer {
        Layer::Qed(image) => {
            m.insert("actual-size".into(), json!(image_actual_size(image)));
            m.insert(
                "cluster-size".into(),
                json!(image.geometry().cluster_size()),
            );
            let header = image.header();
            m.insert(
                "dirty-flag".into(),
                json!(header.features & qed::layout::F_NEED_CHECK != 0),
            );
            if let Some(name) = image.backing_name() {
                m.insert("backing-filename".into(), json!(name));
                let full = match chain.layers.get(index + 1) {
                    Some(b) => b.path.display().to_string(),
                    None if qed::backing::is_protocol_name(&name) => name.clone(),
                    None => qed::backing::resolve_backing_path(&name, Some(&cl.path))
                        .display()
                        .to_string(),
                };
                m.insert("full-backing-filename".into(), json!(full));
                if image.backing_format() == Some(BackingFormat::Raw) {
                    m.insert("backing-filename-format".into(), json!("raw"));
                }
            }
            m.insert(
                "format-specific".into(),
                json!({
                    "type": "qed",
                    "data": {
                        "table-size": image.geometry().table_size(),
                        "header-size": image.geometry().header_size(),
                        "features": header.features,
                        "compat-features": header.compat_features,
                        "autoclear-features": header.autoclear_features,
                        "l1-table-offset": header.l1_table_offset,
                    }
                }),
            );
        }
        Layer::Raw(raw) => {
            m.insert("actual-size".into(), json!(actual_size(raw.file())));
            m.insert("dirty-flag".into(), json!(false));
        }
        Layer::Nbd(_) => {
            m.insert("protocol".into(), json!("nbd"));
        }
        Layer::Qcow2(image) => qcow2_info(chain, index, image, &mut m),
    }
    Value::Object(m)
}

/// qemu-img info's keys for a qcow2 layer.
fn qcow2_info(chain: &Chain, index: usize, image: &Qcow2, m: &mut Map<String, Value>) {
    let cl = &chain.layers[index];
    let header = image.header();
    m.insert("actual-size".into(), json!(actual_size(image.file())));
    m.insert("cluster-size".into(), json!(header.cluster_size()));
    m.insert("dirty-flag".into(), json!(header.incompatible & 1 != 0));
    if let Some(name) = &header.backing_name {
        m.insert("backing-filename".into(), json!(name));
        let full = match chain.layers.get(index + 1) {
            Some(b) => b.path.display().to_string(),
            None if qed::backing::is_protocol_name(name) => name.clone(),
            None => qed::backing::resolve_backing_path(name, Some(&cl.path))
                .display()
                .to_string(),
        };
        m.insert("full-backing-filename".into(), json!(full));
        if let Some(f) = &header.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    let mut data = Map::new();
    data.insert(
        "compat".into(),
        json!(if header.version == 2 { "0.10" } else { "1.1" }),
    );
    if header.version == 3 {
        data.insert("compression-type".into(), json!("zlib"));
        data.insert("refcount-bits".into(), json!(1u64 << header.refcount_order));
    }
    if let Some(f) = &header.data_file {
        data.insert("data-file".into(), json!(f));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": Value::Object(data)}),
    );
}

/// The bytes a QED layer's file takes on disk, through the descriptor it was opened by.
fn image_actual_size(image: &Image) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let path = image.path();
    // The storage is the file itself; its length is known, its block count is not exposed
    // through `Storage`, so ask the path's metadata only when it is still the same file.
    match (path, image.file_id()) {
        (Some(p), Some(id)) => std::fs::metadata(p)
            .ok()
            .filter(|m| m.dev() == id.dev && m.ino() == id.ino)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0),
        _ => 0,
    }
}

/// `qemu-img info --backing-chain --output=json`: one object per layer, top first.
pub fn chain_info_json(chain: &Chain) -> Value {
    Value::Array(
        (0..chain.layers.len())
            .map(|i| info_json(chain, i))
            .collect(),
    )
}

impl Drop for Chain {
    /// Says goodbye to NBD servers (NBD_CMD_DISC) instead of vanishing mid-connection.
    fn drop(&mut self) {
        for cl in &self.layers {
            if let Layer::Nbd(export) = &cl.layer {
                let _ = self.runtime.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(2), export.close()).await
                });
            }
        }
    }
}
