//! Who is calling: modules (by module key or mTLS certificate name) and the administrator.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::constant_time;

use crate::config::ModuleConfig;
use crate::secrets::key_hash;

pub use token_domain::module::Module;

/// The configured modules, looked up by credential.
#[derive(Debug, Default)]
pub struct Modules {
    by_key_hash: HashMap<String, Arc<Module>>,
    by_cert_name: HashMap<String, Arc<Module>>,
}

impl Modules {
    /// Builds the registry from config; `default_audience` is the audience of modules
    /// that configure none.
    pub fn from_config(modules: &[ModuleConfig], default_audience: &str) -> Self {
        let mut registry = Self::default();
        for m in modules {
            let audiences = if m.audiences.is_empty() {
                vec![default_audience.to_owned()]
            } else {
                m.audiences.clone()
            };
            let module = Arc::new(Module {
                id: m.id.clone(),
                delegable: m.delegable.clone(),
                max_lifetime: m.max_lifetime,
                default_lifetime: m.default_lifetime.min(m.max_lifetime),
                tenants: m.tenants.as_ref().map(|t| t.iter().cloned().collect()),
                audiences,
                on_logout: m.on_logout.clone(),
            });
            if let Some(h) = &m.key_sha256 {
                registry
                    .by_key_hash
                    .insert(h.to_ascii_lowercase(), Arc::clone(&module));
            }
            if let Some(name) = &m.mtls_subject {
                registry.by_cert_name.insert(name.clone(), module);
            }
        }
        registry
    }

    /// The module whose key this is. Only the key's hash is compared, so lookup time says
    /// nothing about the key.
    pub fn by_key(&self, key: &str) -> Option<Arc<Module>> {
        self.by_key_hash.get(&key_hash(key)).cloned()
    }

    /// The module whose mTLS certificate carries one of these names (CN or DNS SANs).
    pub fn by_cert_names<'a>(
        &self,
        mut names: impl Iterator<Item = &'a str>,
    ) -> Option<Arc<Module>> {
        names.find_map(|n| self.by_cert_name.get(n).cloned())
    }
}

/// Checks the admin key.
#[derive(Debug, Clone, Default)]
pub struct AdminAuth {
    key_sha256: Option<String>,
}

impl AdminAuth {
    /// From the configured hash; `None` disables the admin service.
    pub fn new(key_sha256: Option<String>) -> Self {
        Self {
            key_sha256: key_sha256.map(|h| h.to_ascii_lowercase()),
        }
    }

    /// Whether `key` is the admin key (constant-time comparison of hashes).
    pub fn check(&self, key: &str) -> bool {
        self.key_sha256.as_ref().is_some_and(|want| {
            constant_time::verify_slices_are_equal(want.as_bytes(), key_hash(key).as_bytes())
                .is_ok()
        })
    }
}
