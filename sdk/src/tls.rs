//! TLS and QUIC transport settings shared by clients and nodes.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM text held no certificate.
    #[error("no certificate found in {what}")]
    NoCertificate {
        /// Which input.
        what: String,
    },
    /// The PEM text did not parse.
    #[error("invalid PEM in {what}: {message}")]
    InvalidPem {
        /// Which input.
        what: String,
        /// Parser message.
        message: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// Idle time after which a connection with no traffic is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval, well under [`IDLE_TIMEOUT`], so idle clients stay connected.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The crypto provider every Quiver endpoint uses (ring; no process-wide default needed).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// A QUIC client configuration that trusts only the given CA and offers the given ALPNs.
pub fn client_config(ca_pem: &[u8], alpns: &[&[u8]]) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(None)));
    Ok(config)
}

/// Transport settings: idle timeout, keep-alive and, for servers, the stream limit.
pub fn transport_config(max_bidi_streams: Option<u32>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    if let Some(n) = max_bidi_streams {
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(n));
    }
    // Larger windows so a 1 MiB value does not stall on flow control.
    t.stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.send_window(16 * 1024 * 1024);
    t
}
