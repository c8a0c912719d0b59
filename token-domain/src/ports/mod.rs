//! What the domain needs from the world, as traits: the store, the identity provider's
//! tokens, the platform's permissions and an observer. The service crate implements
//! them (SQLite and PostgreSQL, JWT verification over HTTP, Prometheus); the domain never
//! names a driver, a protocol or a metrics library.

pub mod observer;
pub mod permissions;
pub mod store;
pub mod subjects;

pub use observer::{NoObserver, Observer};
pub use permissions::{
    NoPermissionSource, PermissionQuery, PermissionSource, Recheck, RecheckPolicy, RecheckQuery,
};
pub use store::{LeaseFilter, Logout, Retire, Store, StoreError, StoredKey};
pub use subjects::{LogoutClaims, Subject, Subjects};
