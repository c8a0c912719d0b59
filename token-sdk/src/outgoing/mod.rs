//! Putting the lease's current token on outgoing calls: a tonic interceptor, a tower
//! layer that also retries a call whose token expired in flight, and (feature `reqwest`)
//! reqwest request builders.

pub(crate) mod auth_layer;
pub(crate) mod interceptor;
