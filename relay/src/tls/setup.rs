//! rustls configurations built from the validated config: one [`ListenerTls`] per TLS
//! listener (shared certificate store and ticket keys, a [`ServerTls`] per worker with its
//! own session cache) and one [`ClientTls`] per pool that speaks TLS to its origins.
//!
//! Crypto provider: aws-lc-rs (rustls's default). Its AES-GCM and P-256/X25519 code is the
//! same assembly OpenSSL/BoringSSL use, so relay's handshake and record costs stand next to
//! HAProxy's on equal terms; ring would build without a C toolchain step but is slower on
//! P-256 and lacks the post-quantum hybrid key exchange (X25519MLKEM768) aws-lc-rs offers.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::{NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::certs::{read_chain, read_key, CertStore};
use crate::config::{ListenerTls as ListenerTlsConfig, PoolTls, TlsVersion};

/// The crypto provider every config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

static BOTH: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];
static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::V1_2 => &BOTH,
        TlsVersion::V1_3 => &ONLY_13,
    }
}

/// A TLS listener's shared state: certificates (reloadable) and ticket keys.
#[derive(Debug)]
pub struct ListenerTls {
    pub store: Arc<CertStore>,
    ticketer: Option<Arc<dyn ProducesTickets>>,
    cfg: ListenerTlsConfig,
    provider: Arc<CryptoProvider>,
}

/// What a worker holds for one TLS listener.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
}

impl ListenerTls {
    /// Loads the certificates; `what` is the config key of the listener's `tls` table.
    pub fn new(cfg: &ListenerTlsConfig, what: &str) -> Result<ListenerTls, String> {
        let provider = provider();
        let store = CertStore::new(cfg.certificates.clone(), what.to_string(), &provider)?;
        let ticketer = if cfg.tickets {
            Some(
                rustls::crypto::aws_lc_rs::Ticketer::new()
                    .map_err(|e| format!("{what}.tickets: cannot create ticket keys: {e}"))?,
            )
        } else {
            None
        };
        Ok(ListenerTls {
            store: Arc::new(store),
            ticketer,
            cfg: cfg.clone(),
            provider,
        })
    }

    /// A worker's server config: shared certificates and ticket keys, its own session cache.
    pub fn for_worker(&self) -> Result<ServerTls, String> {
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions(self.cfg.min_version))
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.store.clone());
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c.session_storage = if self.cfg.session_cache > 0 {
            ServerSessionMemoryCache::new(self.cfg.session_cache)
        } else {
            Arc::new(NoServerSessionStorage {})
        };
        if let Some(t) = &self.ticketer {
            c.ticketer = t.clone();
        }
        // One ticket per full handshake is what a browser uses; the second rustls sends by
        // default costs an encryption per handshake for nothing.
        c.send_tls13_tickets = 1;
        Ok(ServerTls {
            config: Arc::new(c),
        })
    }

    /// Re-reads certificate and key files (SIGHUP).
    pub fn reload(&self) -> Result<(), String> {
        self.store.reload(&self.provider)
    }
}

/// TLS toward the origins of one pool.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// `what` is the pool's config key (`pool[2]`); `host` the name to verify when
    /// `tls_server_name` is not set (an origin's host name, or its IP address).
    pub fn new(cfg: &PoolTls, host: &str, what: &str) -> Result<ClientTls, String> {
        let mut roots = RootCertStore::empty();
        match &cfg.ca {
            Some(path) => {
                for c in read_chain(path, &format!("{what}.tls_ca"))? {
                    roots.add(c).map_err(|e| {
                        format!(
                            "{what}.tls_ca: {}: unusable CA certificate: {e}",
                            path.display()
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(format!(
                        "{what}.tls: no system CA certificates found (/etc/ssl/certs); set {what}.tls_ca"
                    ));
                }
            }
        }
        let name = cfg.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            format!("{what}.tls_server_name: {name:?} is not a valid DNS name or IP address")
        })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(TlsVersion::V1_2))
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots);
        let mut c = match &cfg.client_cert {
            Some((cert, key)) => {
                let chain = read_chain(cert, &format!("{what}.tls_client_cert"))?;
                let key = read_key(key, &format!("{what}.tls_client_key"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{what}.tls_client_key: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c.resumption = Resumption::in_memory_sessions(1024);
        Ok(ClientTls {
            config: Arc::new(c),
            server_name,
        })
    }
}
