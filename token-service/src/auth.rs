//! Who is calling: modules (by module key or mTLS certificate name) and the administrator.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::constant_time;

use crate::config::{ModuleConfig, OnLogoutConfig};
use crate::lease::OnLogout;
use crate::secrets::key_hash;

/// A module allowed to hold leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its id (the token's `act.sub`).
    pub id: String,
    /// Permissions it may delegate.
    pub delegable: Vec<String>,
    /// Cap on its lease lifetime.
    pub max_lifetime: Duration,
    /// Lifetime when a request names none.
    pub default_lifetime: Duration,
    /// Tenants it serves; `None`: every tenant.
    pub tenants: Option<HashSet<String>>,
    /// Audiences its tokens may name (the service's default audience when none are
    /// configured).
    pub audiences: Vec<String>,
    /// Its logout policies: the default and those a grant may ask for.
    pub on_logout: OnLogoutConfig,
}

impl Module {
    /// How the module is named in `ended_by` and audit events.
    pub fn principal(&self) -> String {
        format!("module:{}", self.id)
    }

    /// Whether it serves `tenant`.
    pub fn serves(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
    }

    /// The tenant a request means when it names none: the module's only tenant, if it
    /// serves exactly one.
    pub fn only_tenant(&self) -> Option<&str> {
        match &self.tenants {
            Some(t) if t.len() == 1 => t.iter().next().map(String::as_str),
            _ => None,
        }
    }

    /// The logout policy of a grant that asks for `requested` (`None`: the default), or
    /// `None` when the module may not ask for it.
    pub fn logout_policy(&self, requested: Option<OnLogout>) -> Option<OnLogout> {
        let policy = requested.unwrap_or(self.on_logout.default);
        self.on_logout.allowed.contains(&policy).then_some(policy)
    }

    /// Whether its tokens may name `audience`.
    pub fn may_address(&self, audience: &str) -> bool {
        self.audiences.iter().any(|a| a == audience)
    }
}

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
