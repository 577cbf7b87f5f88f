//! X.509 credentials for the NBD-over-TLS tests, made at test time by GnuTLS's `certtool` (what
//! QEMU's documentation uses, so the keys are PKCS#1 RSA as operators' are), in the directory
//! layout of QEMU's `tls-creds-x509`, nbdkit's `--tls-certificates` and libnbd's
//! `tls-certificates=`. A missing `certtool` fails the test loudly (`.ci/run` installs
//! `gnutls-bin`).
//!
//! One [`Pki`] is one CA; it makes server and client directories signed by it, current or
//! expired. Two `Pki`s are two unrelated CAs (for the wrong-CA tests). [`create_args`] and
//! [`convert_args`]: how the tests and benches put a QED overlay on an export over TLS and read
//! one with `qedstream`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::ok_command;

/// Whether a certificate is valid now or expired long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid from yesterday for ten years.
    Current,
    /// Valid only during 2019.
    Expired,
}

/// A certificate authority in a directory (`ca-key.pem`, `ca-cert.pem`), and the credentials
/// directories it signs.
#[derive(Debug)]
pub struct Pki {
    root: PathBuf,
}

impl Pki {
    /// A new CA named `name` under `root` (created if needed).
    pub fn new(root: &Path, name: &str) -> Self {
        let pki = Self {
            root: root.to_path_buf(),
        };
        std::fs::create_dir_all(pki.ca_dir()).unwrap();
        let template = pki.ca_dir().join("ca.info");
        std::fs::write(
            &template,
            format!(
                "cn = \"{name}\"\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 3650\n"
            ),
        )
        .unwrap();
        let key = pki.ca_dir().join("ca-key.pem");
        private_key(&key);
        ok_command(certtool().args([
            "--generate-self-signed",
            "--load-privkey",
            path(&key),
            "--template",
            path(&template),
            "--outfile",
            path(&pki.ca_cert()),
        ]));
        pki
    }

    fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// The CA's certificate (`ca-cert.pem`).
    pub fn ca_cert(&self) -> PathBuf {
        self.ca_dir().join("ca-cert.pem")
    }

    /// A server directory `root/NAME` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`)
    /// whose certificate names each of `hosts` (DNS names, or IP addresses).
    pub fn server(&self, name: &str, hosts: &[&str], validity: Validity) -> PathBuf {
        let mut template = String::from("organization = \"qedstream tests\"\ncn = \"server\"\n");
        for host in hosts {
            if host.parse::<std::net::IpAddr>().is_ok() {
                template.push_str(&format!("ip_address = \"{host}\"\n"));
            } else {
                template.push_str(&format!("dns_name = \"{host}\"\n"));
            }
        }
        template.push_str("tls_www_server\nencryption_key\nsigning_key\n");
        self.leaf(name, "server", &template, validity)
    }

    /// A client directory `root/NAME` (`ca-cert.pem`, and with `certificate`,
    /// `client-cert.pem` and `client-key.pem`).
    pub fn client(&self, name: &str, certificate: bool, validity: Validity) -> PathBuf {
        if !certificate {
            let dir = self.root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(self.ca_cert(), dir.join("ca-cert.pem")).unwrap();
            return dir;
        }
        let template = "organization = \"qedstream tests\"\ncn = \"client\"\n\
                        tls_www_client\nencryption_key\nsigning_key\n";
        self.leaf(name, "client", template, validity)
    }

    /// Signs `ROLE-cert.pem` / `ROLE-key.pem` into `root/NAME`, beside a copy of the CA.
    fn leaf(&self, name: &str, role: &str, template: &str, validity: Validity) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.ca_cert(), dir.join("ca-cert.pem")).unwrap();
        let dates = match validity {
            Validity::Current => "expiration_days = 3650\n".to_string(),
            Validity::Expired => "activation_date = \"2019-01-01 00:00:00 UTC\"\n\
                                  expiration_date = \"2019-12-31 00:00:00 UTC\"\n"
                .to_string(),
        };
        let info = dir.join(format!("{role}.info"));
        std::fs::write(&info, format!("{template}{dates}")).unwrap();
        let key = dir.join(format!("{role}-key.pem"));
        private_key(&key);
        ok_command(certtool().args([
            "--generate-certificate",
            "--load-privkey",
            path(&key),
            "--load-ca-certificate",
            path(&self.ca_cert()),
            "--load-ca-privkey",
            path(&self.ca_dir().join("ca-key.pem")),
            "--template",
            path(&info),
            "--outfile",
            path(&dir.join(format!("{role}-cert.pem"))),
        ]));
        std::fs::remove_file(info).unwrap();
        dir
    }
}

/// `certtool` with its output quiet.
fn certtool() -> Command {
    let mut cmd = Command::new("certtool");
    cmd.arg("--no-text");
    cmd
}

/// A 2048-bit RSA key, PKCS#1 as certtool writes it by default.
fn private_key(out: &Path) {
    ok_command(certtool().args([
        "--generate-privkey",
        "--key-type=rsa",
        "--bits=2048",
        "--outfile",
        path(out),
    ]));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `qedstream`'s arguments that create the QED overlay `image` over the export `uri`, reached
/// over TLS with the client credentials directory `creds`: `create --tls-creds CREDS -b URI
/// -F raw IMAGE`.
pub fn create_args<'a>(creds: &'a str, uri: &'a str, image: &'a str) -> [&'a str; 8] {
    [
        "create",
        "--tls-creds",
        creds,
        "-b",
        uri,
        "-F",
        "raw",
        image,
    ]
}

/// `qedstream`'s arguments that read the export `uri` over TLS, with the client credentials
/// directory `creds`, into the raw file `out`: `convert --tls-creds CREDS -f raw -O raw URI
/// OUT`.
pub fn convert_args<'a>(creds: &'a str, uri: &'a str, out: &'a str) -> [&'a str; 9] {
    [
        "convert",
        "--tls-creds",
        creds,
        "-f",
        "raw",
        "-O",
        "raw",
        uri,
        out,
    ]
}
