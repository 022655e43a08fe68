//! Certificates: loading PEM chains and keys with errors that name the config key, and
//! picking one by SNI (exact name, then wildcard, then the listener's default).
//!
//! The set a listener serves sits behind a lock in [`CertStore`]; SIGHUP builds a new set from
//! the same files and swaps it in. A handshake takes the lock for reading long enough to clone
//! one `Arc`; connections already established keep the certificate they were given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One `[[listener.tls.certificate]]` entry as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names to serve it for; empty = the certificate's DNS names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// A loaded certificate chain with its key and the names it answers.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    /// notAfter, seconds since the epoch (for the log and the expiry metric).
    pub not_after: i64,
}

/// Reads a PEM chain (leaf first) and its key; checks the key matches the leaf and that the
/// leaf is valid now. `what` names the config entry in errors.
pub fn load(spec: &CertSpec, provider: &CryptoProvider, what: &str) -> Result<Loaded, String> {
    let chain = read_chain(&spec.cert, &format!("{what}.cert"))?;
    let key = read_key(&spec.key, &format!("{what}.key"))?;
    let info = leaf_info(&chain[0], &format!("{what}.cert"), &spec.cert)?;
    let now = UnixTime::now().as_secs() as i64;
    if now < info.not_before {
        return Err(format!(
            "{what}.cert: {} is not valid yet (notBefore {})",
            spec.cert.display(),
            info.not_before_text
        ));
    }
    if now > info.not_after {
        return Err(format!(
            "{what}.cert: {} expired (notAfter {})",
            spec.cert.display(),
            info.not_after_text
        ));
    }
    let signer = provider.key_provider.load_private_key(key).map_err(|e| {
        format!(
            "{what}.key: {}: unsupported private key: {e}",
            spec.key.display()
        )
    })?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(format!(
                "{what}.key: {} does not match the certificate in {}",
                spec.key.display(),
                spec.cert.display()
            ))
        }
    }
    let names = if spec.names.is_empty() {
        info.dns_names
    } else {
        spec.names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok(Loaded {
        key: Arc::new(ck),
        names,
        not_after: info.not_after,
    })
}

/// Reads every certificate in a PEM file (a chain, leaf first).
pub fn read_chain(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path, key)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| format!("{key}: {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn read_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path, key)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{key}: {} holds no private key (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
            path.display()
        ),
        e => format!("{key}: {}: bad PEM: {e}", path.display()),
    })
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

struct LeafInfo {
    dns_names: Vec<String>,
    not_before: i64,
    not_after: i64,
    not_before_text: String,
    not_after_text: String,
}

fn leaf_info(der: &CertificateDer<'_>, key: &str, path: &Path) -> Result<LeafInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("{key}: {}: not an X.509 certificate: {e}", path.display()))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                dns_names.push(d.to_ascii_lowercase());
            }
        }
    }
    if dns_names.is_empty() {
        // Old certificates name the host only in the subject's common name.
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                dns_names.push(s.to_ascii_lowercase());
            }
        }
    }
    let v = cert.validity();
    Ok(LeafInfo {
        dns_names,
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        not_before_text: v.not_before.to_string(),
        not_after_text: v.not_after.to_string(),
    })
}

/// Certificates of one listener, indexed by name.
#[derive(Debug)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// Earliest notAfter in the set.
    pub not_after: i64,
}

impl CertSet {
    /// Loads every entry; the first is the default.
    pub fn load(specs: &[CertSpec], provider: &CryptoProvider, what: &str) -> Result<Self, String> {
        let mut loaded = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            loaded.push(load(spec, provider, &format!("{what}.certificate[{i}]"))?);
        }
        CertSet::from_loaded(loaded).ok_or_else(|| format!("{what}.certificate: none configured"))
    }

    fn from_loaded(loaded: Vec<Loaded>) -> Option<CertSet> {
        let default = loaded.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut not_after = i64::MAX;
        for l in loaded {
            not_after = not_after.min(l.not_after);
            for n in &l.names {
                // The first certificate that claims a name keeps it.
                match n.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(n.clone()),
                }
                .or_insert_with(|| l.key.clone());
            }
        }
        Some(CertSet {
            exact,
            wildcard,
            default,
            not_after,
        })
    }

    /// The certificate for a client's SNI name.
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

/// A listener's certificates, swappable at reload.
#[derive(Debug)]
pub struct CertStore {
    specs: Vec<CertSpec>,
    what: String,
    current: RwLock<Arc<CertSet>>,
}

impl CertStore {
    pub fn new(
        specs: Vec<CertSpec>,
        what: String,
        provider: &CryptoProvider,
    ) -> Result<Self, String> {
        let set = CertSet::load(&specs, provider, &what)?;
        Ok(CertStore {
            specs,
            what,
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// Re-reads the files. On error the old set stays and the error is returned.
    pub fn reload(&self, provider: &CryptoProvider) -> Result<(), String> {
        let set = CertSet::load(&self.specs, provider, &self.what)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(())
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(set.pick(hello.server_name()))
    }
}
