//! Certificates: a cluster CA and a node certificate signed by it, created on first start.
//!
//! Files in the data directory:
//! - `ca.pem`: the cluster CA certificate; clients trust it (`--ca` / `QUIVER_CA`).
//! - `ca.key`: the CA private key (mode 0600), kept so the node can sign its own certificate
//!   again and, later, certificates of nodes joining the cluster.
//! - `node.pem`, `node.key`: this node's certificate and key.
//!
//! Every node certificate names [`NODE_SERVER_NAME`] (plus `localhost` and the listen IP),
//! so a client verifies "a node of this cluster" whatever address it dialled.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use quiver_sdk::wire::NODE_SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Common name of every Quiver cluster CA.
const CA_COMMON_NAME: &str = "Quiver cluster CA";

/// Errors of certificate bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("certificate file {path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// rcgen could not build a certificate or key.
    #[error("cannot generate {what}: {message}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's message.
        message: String,
    },
    /// A PEM file exists but does not parse.
    #[error("invalid PEM in {path}: {message}")]
    Invalid {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// Paths of the certificate files in a data directory.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// Cluster CA certificate.
    pub ca_cert: PathBuf,
    /// Cluster CA key.
    pub ca_key: PathBuf,
    /// Node certificate.
    pub node_cert: PathBuf,
    /// Node key.
    pub node_key: PathBuf,
}

impl CertPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> CertPaths {
        CertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node.key"),
        }
    }
}

/// The node's TLS identity, loaded and ready for rustls.
#[derive(Debug)]
pub struct NodeIdentity {
    /// Node certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// Node private key.
    pub key: PrivateKeyDer<'static>,
    /// PEM of the cluster CA, for peers and clients to trust.
    pub ca_pem: Vec<u8>,
}

fn gen_err(what: &'static str) -> impl Fn(rcgen::Error) -> CertError {
    move |e| CertError::Generate {
        what,
        message: e.to_string(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA params"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Writes a file atomically (temp file + rename) with the given Unix mode.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Creates the cluster CA in `dir` if it is not there yet. Returns true if it was created.
pub fn ensure_ca(dir: &Path) -> Result<bool, CertError> {
    let paths = CertPaths::in_dir(dir);
    if paths.ca_cert.exists() && paths.ca_key.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let cert = ca_params()?
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;
    write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// Issues a node certificate signed by the CA in `ca_dir` and writes it to `out_dir`.
pub fn issue_node_cert(
    ca_dir: &Path,
    out_dir: &Path,
    node_id: &str,
    ips: &[IpAddr],
) -> Result<(), CertError> {
    let ca = CertPaths::in_dir(ca_dir);
    let ca_key_pem = std::fs::read_to_string(&ca.ca_key).map_err(io_err(&ca.ca_key))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::Invalid {
        path: ca.ca_key.clone(),
        message: e.to_string(),
    })?;
    // rcgen needs only the CA's name, key-id method and usages to sign; they are fixed here,
    // so rebuilding the parameters reproduces the CA as issuer without parsing its PEM.
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_string(), "localhost".into()])
        .map_err(gen_err("node params"))?;
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    let key = KeyPair::generate().map_err(gen_err("node key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(gen_err("node certificate"))?;

    let out = CertPaths::in_dir(out_dir);
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    write_file(&out.node_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out.node_cert, cert.pem().as_bytes(), 0o644)?;
    if ca_dir != out_dir {
        let ca_pem = std::fs::read(&ca.ca_cert).map_err(io_err(&ca.ca_cert))?;
        write_file(&out.ca_cert, &ca_pem, 0o644)?;
    }
    Ok(())
}

/// First-start bootstrap: creates the CA and the node certificate when missing, then loads
/// the node's identity.
pub fn bootstrap(
    dir: &Path,
    node_id: &str,
    listen_ip: IpAddr,
    ca_dir: Option<&Path>,
) -> Result<NodeIdentity, CertError> {
    let paths = CertPaths::in_dir(dir);
    if !(paths.node_cert.exists() && paths.node_key.exists()) {
        let ca_dir = match ca_dir {
            Some(ca) => ca,
            None => {
                if !paths.ca_cert.exists() {
                    ensure_ca(dir)?;
                }
                dir
            }
        };
        let mut ips = vec![listen_ip];
        if listen_ip.is_unspecified() || !listen_ip.is_loopback() {
            ips.push(IpAddr::from([127, 0, 0, 1]));
        }
        issue_node_cert(ca_dir, dir, node_id, &ips)?;
    }
    let identity = load_identity(&paths)?;
    // Peers check the node id a request claims against the certificate, so a data
    // directory whose certificate names another node would be refused by every peer.
    let named = identity.chain.first().and_then(|c| node_id_of(c.as_ref()));
    if named.as_deref() != Some(node_id) {
        return Err(CertError::Invalid {
            path: paths.node_cert.clone(),
            message: format!(
                "the certificate is for node {named:?}, not {node_id:?}: start with that \
                 --node-id, or use a fresh data directory"
            ),
        });
    }
    Ok(identity)
}

/// The node id a node certificate was issued for (its subject common name), if the DER
/// parses and names one. Peers are who their certificate says: see `server.rs`.
pub fn node_id_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Loads a node identity from its files.
pub fn load_identity(paths: &CertPaths) -> Result<NodeIdentity, CertError> {
    let invalid = |path: &Path, e: &dyn std::fmt::Display| CertError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let chain_pem = std::fs::read(&paths.node_cert).map_err(io_err(&paths.node_cert))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&paths.node_cert, &e))?;
    if chain.is_empty() {
        return Err(invalid(&paths.node_cert, &"no certificate"));
    }
    let key_pem = std::fs::read(&paths.node_key).map_err(io_err(&paths.node_key))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(&paths.node_key, &e))?;
    let ca_pem = std::fs::read(&paths.ca_cert).map_err(io_err(&paths.ca_cert))?;
    Ok(NodeIdentity { chain, key, ca_pem })
}
