//! The gate every backing open goes through, and the chain opener.
//!
//! A QED header names its backing by a string: a path (relative names resolve against the
//! image's folder), or an `nbd://`, `nbd+unix://`, legacy `nbd:` or `json:` NBD name, which
//! opens through `nbd-client`. The recorded format is "raw, never probe" (the
//! `BACKING_FORMAT_NO_PROBE` bit) or nothing, in which case the backing is probed (QED or raw),
//! as QEMU does. Probing an untrusted image's backing is dangerous: a guest that wrote a QED
//! header into its raw disk could make the host open any file that header names. The [`Gate`]
//! therefore decides whether probing is allowed, confines file names to a directory, decides
//! whether NBD names may be opened, and bounds the chain depth; a chain that names a file
//! already in it is refused as a loop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use qed::backing::{
    is_protocol_name, normalise, probe_format, probe_storage, resolve_backing_path,
};
use qed::{BackingFormat, BackingPolicy, Image, OpenOptions};

use crate::device::BlockDevice;
use crate::error::{blocking, Error, GateRefusal, Result};
use crate::image::QedImage;
use crate::nbd::NbdExport;
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
    /// How NBD backings connect (timeouts, reconnect window).
    pub nbd: nbd_client::ClientConfig,
    /// Open backing files, and a read-only top image, with [`qed::Access::SharedRead`]
    /// (`-U`: inspect an image another process may be writing) instead of
    /// [`qed::Access::ReadOnly`], which keeps writers and resizers out.
    pub force_share: bool,
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
        }
    }
}

type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<dyn BlockDevice>>> + Send + 'a>>;

fn absolute(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    abs.canonicalize().unwrap_or_else(|_| normalise(&abs))
}

impl Gate {
    fn refuse(&self, name: &str, image: Option<&Path>, refusal: GateRefusal) -> Error {
        Error::Gate {
            name: name.to_string(),
            image: image.map(|p| p.display().to_string()).unwrap_or_default(),
            refusal,
        }
    }

    /// Checks a file name: depth, confinement and loops. Returns the resolved path.
    pub fn admit_file(
        &self,
        name: &str,
        image_path: Option<&Path>,
        depth: u32,
        seen: &[PathBuf],
    ) -> Result<PathBuf> {
        if depth > self.max_depth {
            return Err(self.refuse(name, image_path, GateRefusal::TooDeep(self.max_depth)));
        }
        let path = resolve_backing_path(name, image_path);
        let real = absolute(&path);
        if let Some(root) = &self.confine_to {
            if !real.starts_with(absolute(root)) {
                return Err(self.refuse(name, image_path, GateRefusal::OutsideConfinement(path)));
            }
        }
        if seen.contains(&real) {
            return Err(self.refuse(name, image_path, GateRefusal::Loop(path)));
        }
        Ok(path)
    }

    /// Opens the backing `name` (as stored in the header of the image at `image_path`) with
    /// the recorded `format`, `depth` layers below the top, and its own chain below it.
    /// `seen` holds the canonical paths of the layers above.
    pub fn open_backing<'a>(
        &'a self,
        name: &'a str,
        format: BackingFormat,
        image_path: Option<&'a Path>,
        depth: u32,
        seen: Vec<PathBuf>,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            if is_protocol_name(name) {
                if !self.allow_nbd {
                    return Err(self.refuse(
                        name,
                        image_path,
                        GateRefusal::Protocol(name.to_string()),
                    ));
                }
                if depth > self.max_depth {
                    return Err(self.refuse(
                        name,
                        image_path,
                        GateRefusal::TooDeep(self.max_depth),
                    ));
                }
                let export = NbdExport::connect(name, self.nbd.clone()).await?;
                if format == BackingFormat::Probe {
                    // QEMU would probe the export's first bytes. We read raw only: refuse a
                    // QED image exported as raw rather than misread it.
                    let head =
                        crate::device::read_padded(&export, 0, 64.min(export.size() as usize))
                            .await?;
                    let found = probe_format(&head);
                    if found != "raw" {
                        export.close().await?;
                        return Err(self.refuse(
                            name,
                            image_path,
                            GateRefusal::UnsupportedFormat(found),
                        ));
                    }
                }
                return Ok(Arc::new(export) as Arc<dyn BlockDevice>);
            }
            let path = self.admit_file(name, image_path, depth, &seen)?;
            let access = self.read_access();
            let p = path.clone();
            // One open: the descriptor that is locked and probed is the one that is used.
            let (file, found) = blocking(move || {
                let file =
                    qed::file::open(&p, access).map_err(Error::qed(&p.display().to_string()))?;
                if format == BackingFormat::Raw {
                    return Ok((file, "raw"));
                }
                let found = probe_storage(&file).map_err(|source| Error::Open {
                    path: p.clone(),
                    source,
                })?;
                Ok((file, found))
            })
            .await?;
            if format == BackingFormat::Probe && !self.allow_probe {
                return Err(self.refuse(name, image_path, GateRefusal::ProbeForbidden));
            }
            match found {
                "raw" => {
                    Ok(Arc::new(RawFile::from_file(file, path, false)?) as Arc<dyn BlockDevice>)
                }
                "qed" => {
                    let mut seen = seen;
                    seen.push(absolute(&path));
                    let p = path.clone();
                    let force_share = self.force_share;
                    let image = blocking(move || {
                        let options = OpenOptions {
                            read_only: true,
                            force_share,
                            path: Some(p.clone()),
                            backing: BackingPolicy::Detached,
                            ..OpenOptions::default()
                        };
                        Image::open(Box::new(file), options)
                            .map_err(Error::qed(&p.display().to_string()))
                    })
                    .await?;
                    let below = self.open_below(&image, &path, depth, seen).await?;
                    Ok(
                        Arc::new(QedImage::new(image, path.display().to_string(), below))
                            as Arc<dyn BlockDevice>,
                    )
                }
                other => Err(self.refuse(name, image_path, GateRefusal::UnsupportedFormat(other))),
            }
        })
    }

    /// How files below the top are opened: [`qed::Access::ReadOnly`], or
    /// [`qed::Access::SharedRead`] with [`Gate::force_share`].
    pub fn read_access(&self) -> qed::Access {
        if self.force_share {
            qed::Access::SharedRead
        } else {
            qed::Access::ReadOnly
        }
    }

    /// Opens the chain below `image` (opened from `path` at `depth`), if its header names one.
    pub async fn open_below(
        &self,
        image: &Image,
        path: &Path,
        depth: u32,
        seen: Vec<PathBuf>,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        let Some(name) = image.backing_name() else {
            return Ok(None);
        };
        let format = image.backing_format().unwrap_or(BackingFormat::Probe);
        let dev = self
            .open_backing(&name, format, Some(path), depth + 1, seen)
            .await?;
        Ok(Some(dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement_and_depth_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate {
            confine_to: Some(dir.path().to_path_buf()),
            ..Gate::default()
        };
        let top = dir.path().join("top.qed");
        assert!(gate
            .admit_file("../../etc/passwd", Some(&top), 1, &[])
            .is_err());
        assert!(gate.admit_file("/etc/passwd", Some(&top), 1, &[]).is_err());
        assert!(gate.admit_file("base.raw", Some(&top), 1, &[]).is_ok());
        let max = qed::backing::DEFAULT_MAX_DEPTH;
        assert!(gate.admit_file("base.raw", Some(&top), max, &[]).is_ok());
        assert!(gate
            .admit_file("base.raw", Some(&top), max + 1, &[])
            .is_err());
        let seen = vec![absolute(&dir.path().join("base.raw"))];
        assert!(matches!(
            gate.admit_file("base.raw", Some(&top), 1, &seen),
            Err(Error::Gate {
                refusal: GateRefusal::Loop(_),
                ..
            })
        ));
    }
}
