//! TLS client set-up shared by `load --tls` and `handshakes`: rustls 0.23 with its default
//! provider (aws-lc-rs), driven over our own non-blocking sockets through the buffered
//! `ClientConnection` (`read_tls` / `process_new_packets` / `reader` / `writer` /
//! `write_tls`, as in rustls's mio examples).
//!
//! What this module owns: the options (`TlsOpts`), the `ClientConfig` they produce, the
//! benchmark-only `--insecure` verifier, and small helpers that name what a finished
//! handshake negotiated. Invariant: a `ClientConfig` built here never offers a key
//! exchange group or protocol version the options did not ask for, so both servers of a
//! comparison are handed the same ClientHello.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption, Tls12Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// Key exchange groups the client offers (one key share each in the ClientHello).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kx {
    /// X25519 only: what OpenSSL 3.0 (HAProxy here) and rustls both pick first when offered,
    /// so both servers do the same key exchange work.
    X25519,
    /// NIST P-256 only.
    P256,
    /// X25519MLKEM768 hybrid only (post-quantum; OpenSSL 3.0 cannot do it).
    X25519Mlkem768,
    /// rustls's defaults (X25519MLKEM768, X25519, P-256, P-384).
    Default,
}

impl Kx {
    pub fn parse(s: &str) -> Result<Kx> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "x25519" => Kx::X25519,
            "p256" | "p-256" | "secp256r1" => Kx::P256,
            "x25519mlkem768" | "mlkem" => Kx::X25519Mlkem768,
            "default" => Kx::Default,
            _ => bail!("--kx {s:?}: one of x25519, p256, x25519mlkem768, default"),
        })
    }

    fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        use aws_lc_rs::kx_group as g;
        match self {
            Kx::X25519 => vec![g::X25519],
            Kx::P256 => vec![g::SECP256R1],
            Kx::X25519Mlkem768 => vec![g::X25519MLKEM768],
            Kx::Default => aws_lc_rs::DEFAULT_KX_GROUPS.to_vec(),
        }
    }
}

/// TLS versions the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
    Any,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version> {
        Ok(match s {
            "1.2" => Version::Tls12,
            "1.3" => Version::Tls13,
            "any" => Version::Any,
            _ => bail!("--tls-version {s:?}: one of 1.2, 1.3, any"),
        })
    }
}

/// How the client checks the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Chain to the CA certificates in this PEM file, and the name must match the SNI.
    Ca(String),
    /// Accept anything (see `InsecureVerifier`).
    Insecure,
}

/// The TLS options of one run.
#[derive(Debug, Clone)]
pub struct TlsOpts {
    pub verify: Verify,
    /// Server name sent as SNI and, with `Verify::Ca`, checked against the certificate.
    pub sni: String,
    pub kx: Kx,
    pub version: Version,
    /// Resume sessions (TLS 1.3 tickets, TLS 1.2 tickets / session IDs).
    pub resume: bool,
}

impl TlsOpts {
    /// The name for `ClientConnection::new`: a DNS name or an IP literal.
    pub fn server_name(&self) -> Result<ServerName<'static>> {
        ServerName::try_from(self.sni.clone()).map_err(|e| anyhow!("--sni {:?}: {e}", self.sni))
    }
}

/// Defaults the SNI to the host part of `target` (without the port and brackets).
pub fn default_sni(target: &str) -> String {
    let host = match target.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => target,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Builds the client config. With `resume`, the config gets its own in-memory session
/// store of `sessions` entries (`handshakes` gives every concurrency slot its own config,
/// see there); without, resumption is disabled entirely (no tickets are kept or offered).
pub fn client_config(o: &TlsOpts, sessions: usize) -> Result<ClientConfig> {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = o.kx.groups();
    let provider = Arc::new(provider);
    let versions: &[&'static rustls::SupportedProtocolVersion] = match o.version {
        Version::Tls12 => &[&rustls::version::TLS12],
        Version::Tls13 => &[&rustls::version::TLS13],
        Version::Any => rustls::DEFAULT_VERSIONS,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions / provider")?;
    let mut cfg = match &o.verify {
        Verify::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--ca {path}: cannot read"))?
            {
                let cert = cert.with_context(|| format!("--ca {path}: bad PEM"))?;
                roots
                    .add(cert)
                    .with_context(|| format!("--ca {path}: not a usable CA certificate"))?;
                n += 1;
            }
            if n == 0 {
                bail!("--ca {path}: no certificate in the file");
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(InsecureVerifier::new(&provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = if o.resume {
        Resumption::store(Arc::new(ClientSessionMemoryCache::new(sessions.max(1))))
            .tls12_resumption(Tls12Resumption::SessionIdOrTickets)
    } else {
        Resumption::disabled()
    };
    Ok(cfg)
}

/// A copy of `cfg` with a session store of its own (for one `handshakes` slot); `cfg`
/// itself when resumption is off.
pub fn with_own_session_store(cfg: &ClientConfig, o: Option<&TlsOpts>) -> ClientConfig {
    let mut c = cfg.clone();
    if o.is_some_and(|o| o.resume) {
        c.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(4)))
            .tls12_resumption(Tls12Resumption::SessionIdOrTickets);
    }
    c
}

/// A new client connection with no limit on buffered output: the closed loop already
/// bounds what is outstanding (inflight x size), and rustls's default 64 KiB limit would
/// turn a large message into a short write that `writer()` reports as 0 bytes taken.
pub fn connect(cfg: &Arc<ClientConfig>, name: &ServerName<'static>) -> Result<ClientConnection> {
    let mut c = ClientConnection::new(cfg.clone(), name.clone())?;
    c.set_buffer_limit(None);
    Ok(c)
}

/// What a finished handshake negotiated, e.g. "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519".
pub fn describe(c: &ClientConnection) -> String {
    let mut s = String::new();
    if let Some(v) = c.protocol_version() {
        let _ = write!(s, "{v:?}");
    }
    if let Some(cs) = c.negotiated_cipher_suite() {
        let _ = write!(s, " {:?}", cs.suite());
    }
    if let Some(g) = c.negotiated_key_exchange_group() {
        let _ = write!(s, " {:?}", g.name());
    }
    if let Some(k) = c.handshake_kind() {
        let _ = write!(s, " {k:?}");
    }
    s.trim().to_string()
}

/// **Benchmark only.** Accepts any certificate and any handshake signature, so that the
/// client spends no CPU on chain building or signature checks and cannot become the
/// bottleneck that hides the server's cost. The server still does all its work (it signs
/// CertificateVerify whether or not anyone checks). Never use this against anything but a
/// server you started yourself on loopback (`load` and `handshakes` refuse other targets).
#[derive(Debug)]
pub struct InsecureVerifier {
    schemes: Vec<SignatureScheme>,
}

impl InsecureVerifier {
    pub fn new(provider: &CryptoProvider) -> Self {
        InsecureVerifier {
            schemes: provider
                .signature_verification_algorithms
                .supported_schemes(),
        }
    }
}

impl ServerCertVerifier for InsecureVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_default_is_the_host() {
        assert_eq!(default_sni("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(default_sni("[::1]:8443"), "::1");
        assert_eq!(default_sni("localhost:8443"), "localhost");
        assert_eq!(default_sni("relay.test"), "relay.test");
    }

    #[test]
    fn option_parsing() {
        assert_eq!(Kx::parse("X25519").unwrap(), Kx::X25519);
        assert_eq!(Kx::parse("p-256").unwrap(), Kx::P256);
        assert!(Kx::parse("ffdhe2048").is_err());
        assert_eq!(Version::parse("1.3").unwrap(), Version::Tls13);
        assert!(Version::parse("1.1").is_err());
        assert_eq!(Kx::X25519.groups().len(), 1);
    }

    fn opts(verify: Verify, sni: &str) -> TlsOpts {
        TlsOpts {
            verify,
            sni: sni.into(),
            kx: Kx::X25519,
            version: Version::Tls13,
            resume: true,
        }
    }

    #[test]
    fn server_names() {
        assert!(opts(Verify::Insecure, "relay.test").server_name().is_ok());
        assert!(opts(Verify::Insecure, "127.0.0.1").server_name().is_ok());
        assert!(opts(Verify::Insecure, "bad name!").server_name().is_err());
    }

    #[test]
    fn configs_build() {
        let c = client_config(&opts(Verify::Insecure, "relay.test"), 4).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let e = client_config(&opts(Verify::Ca("/nonexistent.pem".into()), "x"), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ca /nonexistent.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("relay-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(&opts(Verify::Ca(empty.display().to_string()), "x"), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
