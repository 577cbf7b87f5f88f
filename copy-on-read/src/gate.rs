//! The gate every backing open goes through, and the chain opener.
//!
//! A QED header names its backing by a string: a path (relative names resolve against the
//! image's folder), or an `nbd://`, `nbd+unix://`, legacy `nbd:` or `json:` NBD name, which
//! opens through `nbd-client`. The recorded format is "raw, never probe" (the
//! `BACKING_FORMAT_NO_PROBE` bit) or nothing, in which case the backing is probed (QED, qcow2
//! or raw), as QEMU does. A qcow2 layer names its own backing (and may record its format:
//! `raw` is never probed, any other name is probed) and may need an external data file, which
//! is admitted by the same rules as a backing file (confinement, loops, locks) and never
//! probed. Probing an untrusted image's backing is dangerous: a guest that wrote a QED
//! header into its raw disk could make the host open any file that header names. The [`Gate`]
//! therefore decides whether probing is allowed, confines file names to a directory, decides
//! whether NBD names may be opened, and bounds the chain depth; a chain that names a file
//! already in it is refused as a loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qed::backing::{is_protocol_name, probe_format};
use qed::{BackingFormat, Image, OpenOptions};

use crate::device::BlockDevice;
use crate::error::{blocking, Error, GateRefusal, Result};
use crate::image::QedImage;
use crate::nbd::NbdExport;
use crate::qcow2::{Qcow2, Qcow2Error, Qcow2Image};
use crate::raw::RawFile;

/// What an image may open below it.
#[derive(Clone, Debug)]
pub struct Gate {
    /// Probe the format when the header records none (QED or raw). Default true, as QEMU.
    pub allow_probe: bool,
    /// If set, every backing *file* must resolve inside this directory.
    pub confine_to: Option<PathBuf>,
    /// Allow NBD names (`nbd://`, `nbd+unix://`, `nbd:`, `json:`). Default true.
    pub allow_nbd: bool,
    /// The deepest layer accepted (the top image is depth 0). Default
    /// [`qed::backing::DEFAULT_MAX_DEPTH`].
    pub max_depth: u32,
    /// How NBD backings connect (timeouts, reconnect window, TLS credentials).
    pub nbd: nbd_client::ClientConfig,
    /// Open backing files, and a read-only top image, with [`qed::Access::SharedRead`]
    /// (`-U`: inspect an image another process may be writing) instead of
    /// [`qed::Access::ReadOnly`], which keeps writers and resizers out.
    pub force_share: bool,
    /// How image and raw files are read and written: page cache or O_DIRECT, io_uring or
    /// pread/pwrite (the CLI's `--cache` and `--aio`). Applies to the top image opened with
    /// [`crate::CorDevice::open`] and to every file of its chain.
    pub io: qed::IoConfig,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            allow_probe: true,
            confine_to: None,
            allow_nbd: true,
            max_depth: qed::backing::DEFAULT_MAX_DEPTH,
            nbd: nbd_client::ClientConfig::default(),
            force_share: false,
            io: qed::IoConfig::default(),
        }
    }
}

/// One layer of a backing chain as the gate opened it, before layers are stacked into
/// devices (see [`Gate::open_chain`]).
#[derive(Debug)]
pub enum OpenedLayer {
    /// A raw file, opened and admitted once.
    Raw {
        /// The admitted file.
        raw: RawFile,
        /// The path it resolved to.
        path: PathBuf,
    },
    /// A QED image, opened read-only (its backing is the next layer).
    Qed {
        /// The image.
        image: Box<Image>,
        /// The path it resolved to.
        path: PathBuf,
    },
    /// A qcow2 image, opened read-only (its backing is the next layer).
    Qcow2 {
        /// The image.
        image: Box<Qcow2>,
        /// The path it resolved to.
        path: PathBuf,
    },
    /// An NBD export (read as raw).
    Nbd {
        /// The connected export.
        export: NbdExport,
    },
}

/// The backing an image header names, and the format to open it as.
type NextLayer = Option<(String, BackingFormat)>;

/// The backing `image` names (a format not recorded is probed).
fn qed_backing(image: &Image) -> NextLayer {
    image
        .backing_name()
        .map(|n| (n, image.backing_format().unwrap_or(BackingFormat::Probe)))
}

/// The backing a qcow2 image names: a recorded `raw` is never probed; any other recorded
/// format, or none, is probed (and QED/qcow2/raw are what a probe may find).
fn qcow2_backing(image: &Qcow2) -> NextLayer {
    let header = image.header();
    header.backing_name.clone().map(|n| {
        let format = match header.backing_format.as_deref() {
            Some("raw") => BackingFormat::Raw,
            _ => BackingFormat::Probe,
        };
        (n, format)
    })
}

/// Opens the qcow2 image in `file` (admitted at `path`, `depth` layers below the top, below
/// the files in `seen`): its header is checked, and its external data file, if it has one,
/// admitted by `rules` (never probed). Blocking.
pub fn open_qcow2(
    rules: &qed::gate::Rules,
    file: std::fs::File,
    path: &Path,
    depth: u32,
    seen: &[qed::FileId],
) -> Result<Qcow2> {
    let wrap = |source| Error::Qcow2 {
        path: path.display().to_string(),
        source,
    };
    let header = crate::qcow2::read_header(&file).map_err(wrap)?;
    header.check_readable().map_err(|e| wrap(e.into()))?;
    let data_file = match (&header.data_file, header.has_data_file()) {
        (Some(name), true) => {
            let mut seen = seen.to_vec();
            seen.extend(qed::FileId::of(&file));
            let admitted = rules
                .admit_file(name, Some(path), depth, &seen, BackingFormat::Raw)
                .map_err(|e| {
                    wrap(Qcow2Error::DataFile {
                        name: name.clone(),
                        source: Box::new(match e {
                            qed::Error::Refused(refusal) => Error::Gate {
                                name: name.clone(),
                                image: path.display().to_string(),
                                refusal,
                            },
                            other => Error::qed(name)(other),
                        }),
                    })
                })?;
            Some((admitted.file, admitted.path))
        }
        _ => None,
    };
    Qcow2::open(file, path, header, data_file).map_err(wrap)
}

impl OpenedLayer {
    /// The backing this layer's header names, if any (raw files and NBD exports name none).
    fn next(&self) -> NextLayer {
        match self {
            OpenedLayer::Qed { image, .. } => qed_backing(image),
            OpenedLayer::Qcow2 { image, .. } => qcow2_backing(image),
            OpenedLayer::Raw { .. } | OpenedLayer::Nbd { .. } => None,
        }
    }

    /// The local files this layer reads.
    fn file_ids(&self) -> Vec<qed::FileId> {
        match self {
            OpenedLayer::Qed { image, .. } => image.file_id().into_iter().collect(),
            OpenedLayer::Qcow2 { image, .. } => image.file_ids(),
            OpenedLayer::Raw { raw, .. } => raw.files(),
            OpenedLayer::Nbd { .. } => Vec::new(),
        }
    }

    /// The layer's name in messages: its path, or the export's URI.
    pub fn describe(&self) -> String {
        match self {
            OpenedLayer::Raw { path, .. }
            | OpenedLayer::Qed { path, .. }
            | OpenedLayer::Qcow2 { path, .. } => path.display().to_string(),
            OpenedLayer::Nbd { export } => export.describe(),
        }
    }
}

impl Gate {
    /// The admission rules for files (shared with every other path that opens a backing:
    /// [`qed::gate::Rules::admit_file`]).
    pub fn rules(&self) -> qed::gate::Rules {
        qed::gate::Rules {
            allow_probe: self.allow_probe,
            confine_to: self.confine_to.clone(),
            max_depth: self.max_depth,
            force_share: self.force_share,
        }
    }

    fn refuse(&self, name: &str, image: Option<&Path>, refusal: GateRefusal) -> Error {
        Error::Gate {
            name: name.to_string(),
            image: image.map(|p| p.display().to_string()).unwrap_or_default(),
            refusal,
        }
    }

    /// Wraps `file` (opened from `path`) as [`Gate::io`] says: O_DIRECT or not, on io_uring
    /// or pread/pwrite. Fails when io_uring was asked for and is unavailable, or the file
    /// system refuses O_DIRECT.
    pub fn storage(&self, file: std::fs::File, path: &Path) -> Result<Box<dyn qed::Storage>> {
        storage_for(self.io, file, path)
    }

    /// How files below the top are opened: [`qed::Access::ReadOnly`], or
    /// [`qed::Access::SharedRead`] with [`Gate::force_share`].
    pub fn read_access(&self) -> qed::Access {
        self.rules().access()
    }

    /// Opens one backing layer: `name`, as stored in the header of the image at `image_path`,
    /// `depth` layers below the top, with the `recorded` format; `seen` holds the files above.
    async fn open_layer(
        &self,
        name: &str,
        recorded: BackingFormat,
        image_path: Option<&Path>,
        depth: u32,
        seen: &[qed::FileId],
    ) -> Result<OpenedLayer> {
        let refuse = |r| self.refuse(name, image_path, r);
        if is_protocol_name(name) {
            if !self.allow_nbd {
                return Err(refuse(GateRefusal::Protocol(name.to_string())));
            }
            self.rules().check_depth(depth).map_err(refuse)?;
            let export = NbdExport::connect(name, self.nbd.clone()).await?;
            if recorded == BackingFormat::Probe {
                // QEMU would probe the export's first bytes. We read raw only: refuse a QED
                // image exported as raw rather than misread it.
                let head =
                    crate::device::read_padded(&export, 0, 64.min(export.size() as usize)).await?;
                let found = probe_format(&head);
                if found != "raw" {
                    export.close().await?;
                    return Err(refuse(GateRefusal::UnsupportedFormat(found)));
                }
            }
            return Ok(OpenedLayer::Nbd { export });
        }
        let rules = self.rules();
        let (n, at, seen_now) = (
            name.to_string(),
            image_path.map(Path::to_path_buf),
            seen.to_vec(),
        );
        let force_share = self.force_share;
        let io = self.io;
        let opened = blocking(move || {
            let admitted = match rules.admit_file(&n, at.as_deref(), depth, &seen_now, recorded) {
                Ok(a) => a,
                Err(qed::Error::Refused(r)) => return Ok(Err(r)),
                Err(e) => return Err(Error::qed(&n)(e)),
            };
            let path = admitted.path;
            match admitted.format {
                "raw" => Ok(Ok(OpenedLayer::Raw {
                    raw: RawFile::from_file_with(admitted.file, path.clone(), false, io)?,
                    path,
                })),
                "qed" => {
                    let options = OpenOptions {
                        read_only: true,
                        force_share,
                        path: Some(path.clone()),
                        ..OpenOptions::default()
                    };
                    let storage = storage_for(io, admitted.file, &path)?;
                    let image = Image::open(storage, options)
                        .map_err(Error::qed(&path.display().to_string()))?;
                    Ok(Ok(OpenedLayer::Qed {
                        image: Box::new(image),
                        path,
                    }))
                }
                "qcow2" => {
                    let image = open_qcow2(&rules, admitted.file, &path, depth, &seen_now)?;
                    Ok(Ok(OpenedLayer::Qcow2 {
                        image: Box::new(image),
                        path,
                    }))
                }
                other => Ok(Err(GateRefusal::UnsupportedFormat(other))),
            }
        })
        .await?;
        opened.map_err(refuse)
    }

    /// Opens every layer below `image` (opened from `path`, `depth` layers below the top),
    /// top first, walking the chain iteratively: a chain as deep as [`Gate::max_depth`] costs
    /// no stack. Every file is admitted by the shared rules; a file met twice is a loop.
    pub async fn open_chain(
        &self,
        image: &Image,
        path: &Path,
        depth: u32,
    ) -> Result<Vec<OpenedLayer>> {
        let seen: Vec<qed::FileId> = image.file_id().into_iter().collect();
        self.walk_chain(qed_backing(image), path, depth, seen).await
    }

    /// As [`Gate::open_chain`], below a layer the caller opened (the top of a chain that is
    /// not QED: a qcow2 image given to `convert`, `info` or `map`).
    pub async fn open_chain_below(
        &self,
        layer: &OpenedLayer,
        path: &Path,
        depth: u32,
    ) -> Result<Vec<OpenedLayer>> {
        self.walk_chain(layer.next(), path, depth, layer.file_ids())
            .await
    }

    /// As [`Gate::open_chain`], below a qcow2 image (opened from `path` at `depth`).
    pub async fn open_chain_of_qcow2(
        &self,
        image: &Qcow2,
        path: &Path,
        depth: u32,
    ) -> Result<Vec<OpenedLayer>> {
        self.walk_chain(qcow2_backing(image), path, depth, image.file_ids())
            .await
    }

    /// Opens the layers from `next` (named by the image at `above`, `depth` layers below the
    /// top) down, below the files in `seen`.
    async fn walk_chain(
        &self,
        mut next: NextLayer,
        above: &Path,
        mut depth: u32,
        mut seen: Vec<qed::FileId>,
    ) -> Result<Vec<OpenedLayer>> {
        let mut layers: Vec<OpenedLayer> = Vec::new();
        let mut above = above.to_path_buf();
        while let Some((name, format)) = next.take() {
            depth += 1;
            let layer = self
                .open_layer(&name, format, Some(&above), depth, &seen)
                .await?;
            next = layer.next();
            if let OpenedLayer::Qed { path, .. } | OpenedLayer::Qcow2 { path, .. } = &layer {
                seen.extend(layer.file_ids());
                above = path.clone();
            }
            layers.push(layer);
        }
        Ok(layers)
    }

    /// Opens the qcow2 image in `file` (the top of a chain, admitted by the caller at `path`)
    /// and its whole backing chain, stacked into one read-only device.
    pub async fn open_qcow2_device(
        &self,
        file: std::fs::File,
        path: &Path,
    ) -> Result<Arc<dyn BlockDevice>> {
        let top = self.open_qcow2_top(file, path).await?;
        let mut layers = vec![top];
        layers.extend(self.open_chain_below(&layers[0], path, 0).await?);
        stack(layers).ok_or(Error::Closed)
    }

    /// Opens the qcow2 image in `file` (the top of a chain, admitted by the caller at `path`)
    /// alone, as a layer (its backing is named, not opened).
    pub async fn open_qcow2_top(&self, file: std::fs::File, path: &Path) -> Result<OpenedLayer> {
        let rules = self.rules();
        let path = path.to_path_buf();
        blocking(move || {
            let image = open_qcow2(&rules, file, &path, 0, &[])?;
            Ok(OpenedLayer::Qcow2 {
                image: Box::new(image),
                path,
            })
        })
        .await
    }

    /// Opens the chain below `image` (opened from `path` at `depth`) and stacks it into one
    /// device, if its header names a backing.
    pub async fn open_below(
        &self,
        image: &Image,
        path: &Path,
        depth: u32,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        let layers = self.open_chain(image, path, depth).await?;
        Ok(stack(layers))
    }
}

/// `file` (opened from `path`) as the storage `io` asks for; a refusal names the file.
pub(crate) fn storage_for(
    io: qed::IoConfig,
    file: std::fs::File,
    path: &Path,
) -> Result<Box<dyn qed::Storage>> {
    io.storage(file).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Stacks opened layers (top first) into devices, bottom up: each QED layer reads what it
/// lacks from the device below it.
pub fn stack(layers: Vec<OpenedLayer>) -> Option<Arc<dyn BlockDevice>> {
    let mut below: Option<Arc<dyn BlockDevice>> = None;
    for layer in layers.into_iter().rev() {
        below = Some(match layer {
            OpenedLayer::Raw { raw, .. } => Arc::new(raw),
            OpenedLayer::Qed { image, path } => {
                Arc::new(QedImage::new(*image, path.display().to_string(), below))
            }
            OpenedLayer::Qcow2 { image, path } => {
                Arc::new(Qcow2Image::new(*image, path.display().to_string(), below))
            }
            OpenedLayer::Nbd { export } => Arc::new(export),
        });
    }
    below
}
