//! Shared by the nbd-server tests: a server in the test process (on a tokio runtime of its
//! own, so the test thread can run real client tools against it) over real devices made by
//! QEMU's tools in a temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, Populate, RawFile};
use nbd_server::{Export, ListenAddr, Server, ServerConfig};

/// A server serving one export on a unix socket in a temp dir.
pub struct Served {
    pub runtime: tokio::runtime::Runtime,
    pub server: Arc<Server>,
    pub sock: PathBuf,
    pub device: Arc<dyn BlockDevice>,
    pub layers: Option<Arc<dyn Populate>>,
}

impl Served {
    /// `nbd+unix:///NAME?socket=SOCK`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Shuts the server down and closes the device (so QEMU may open the files again).
    pub fn stop(self) {
        self.runtime.block_on(async {
            self.server.shutdown().await.expect("shutdown");
            self.device.close().await.expect("closing the device");
        });
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `device` as export `name` (with `layers`, read-only as asked) on `dir/nbd.sock`.
pub fn serve_device(
    runtime: tokio::runtime::Runtime,
    dir: &Path,
    device: Arc<dyn BlockDevice>,
    layers: Option<Arc<dyn Populate>>,
    read_only: bool,
    config: ServerConfig,
) -> Served {
    let sock = dir.join("nbd.sock");
    let mut export = Export::new("", Arc::clone(&device)).read_only(read_only);
    if let Some(l) = &layers {
        export = export.with_layers(Arc::clone(l));
    }
    let server = Server::new(vec![export], config);
    let addr = ListenAddr::Unix(sock.clone());
    runtime.block_on(server.bind(&addr)).expect("bind");
    Served {
        runtime,
        server,
        sock,
        device,
        layers,
    }
}

/// Serves the raw file `dir/name`, opened writable (`read_only` makes the export refuse
/// writes, not the file).
pub fn serve_raw(dir: &Path, name: &str, read_only: bool) -> Served {
    let rt = runtime();
    let dev = RawFile::open(&dir.join(name), true).expect("opening the raw file");
    serve_device(
        rt,
        dir,
        Arc::new(dev),
        None,
        read_only,
        ServerConfig::default(),
    )
}

/// Serves the QED image `dir/name` through a copy-on-read device, with its layers.
pub fn serve_cor(dir: &Path, name: &str, config: ServerConfig) -> Served {
    let rt = runtime();
    let path = dir.join(name);
    let dev = rt
        .block_on(CorDevice::open(&path, CorOptions::default()))
        .expect("opening the QED image");
    let dev = Arc::new(dev);
    let layers: Arc<dyn Populate> = dev.clone();
    serve_device(rt, dir, dev, Some(layers), false, config)
}

/// The path as a `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
