//! The module: a backend service allowed to hold leases, as the domain sees it (its
//! credentials are the service crate's `auth` module).

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use crate::lease::OnLogout;

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

/// `[modules.on_logout]`: a module's logout policies.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnLogoutConfig {
    /// When the grant asks for none. Default `survive`.
    #[serde(default)]
    pub default: OnLogout,
    /// Policies a grant may ask for. Default both (`["survive", "end"]`); `["end"]` makes
    /// every lease of the module end at the user's logout.
    #[serde(default = "default_logout_policies")]
    pub allowed: Vec<OnLogout>,
}

impl Default for OnLogoutConfig {
    fn default() -> Self {
        Self {
            default: OnLogout::Survive,
            allowed: default_logout_policies(),
        }
    }
}

fn default_logout_policies() -> Vec<OnLogout> {
    vec![OnLogout::Survive, OnLogout::End]
}
