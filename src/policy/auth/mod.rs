//! `[route.auth]`: who is this client (401 when we cannot tell) and may it use
//! this route (403 when it may not), decided at the edge before a byte reaches
//! the backend.
//!
//! Two modes. **JWT**: the token is looked for in [`token`] order, verified in
//! [`jwt`] with the algorithm pinned by the configured key, then the scope is
//! checked. **Forward auth** ([`forward`]): an HTTP auth service decides.
//! Either way a pass is an [`AuthGrant`] the proxy applies to the upstream
//! request: identity headers set by us (any copy the client sent is stripped
//! first, see [`AuthPolicy::strip_spoofable`]) and, optionally, the token
//! removed from the query string.
//!
//! Tokens, cookies and secrets are never logged nor echoed in a reason.

pub(crate) mod forward;
pub(crate) mod jwt;
pub(crate) mod token;

use std::time::{Duration, SystemTime};

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::error::Rejection;

use forward::ForwardAuth;
use jwt::{Keys, Rules};
use token::{Locations, Source};

pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A route's validated `[route.auth]`.
#[derive(Debug)]
pub struct AuthPolicy {
    pub(crate) mode: Mode,
    /// Every header name this policy sets upstream; a client-sent copy would
    /// be taken as our word by the backend, so it is always removed.
    pub(crate) spoofable: Vec<HeaderName>,
}

#[derive(Debug)]
pub(crate) enum Mode {
    Jwt(JwtAuth),
    Forward(ForwardAuth),
}

#[derive(Debug)]
pub(crate) struct JwtAuth {
    pub(crate) keys: Keys,
    pub(crate) rules: Rules,
    pub(crate) locations: Locations,
    pub(crate) required_scope: Option<String>,
    /// claim → header on the upstream request.
    pub(crate) forward_claims: Vec<(String, HeaderName)>,
    /// Remove `token_query` from the URI before forwarding.
    pub(crate) strip_token: bool,
}

/// What a passed check adds to the upstream request.
#[derive(Debug, Default)]
pub struct AuthGrant {
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The query parameter to remove (`strip_token`).
    strip_query: Option<String>,
}

impl AuthPolicy {
    /// Runs the token check (or the forward-auth subrequest) for a request.
    pub async fn check(&self, parts: &Parts) -> Result<AuthGrant, Rejection> {
        match &self.mode {
            Mode::Jwt(auth) => auth.check(parts, unix_now()),
            // Boxed: the subrequest's future is large, and every request's
            // future (a direct WebSocket's lives as long as its tunnel) would
            // otherwise be sized for it.
            Mode::Forward(auth) => Ok(AuthGrant {
                headers: Box::pin(auth.check(parts)).await?,
                strip_query: None,
            }),
        }
    }

    /// Removes every header this policy sets upstream from the client's request.
    pub fn strip_spoofable(&self, headers: &mut HeaderMap) {
        for name in &self.spoofable {
            headers.remove(name);
        }
    }
}

impl AuthGrant {
    /// Adds the identity headers and, with `strip_token`, removes the token
    /// query parameter from the URI (other parameters kept byte for byte).
    pub fn apply(self, parts: &mut Parts) {
        for (name, _) in &self.headers {
            parts.headers.remove(name);
        }
        for (name, value) in self.headers {
            parts.headers.append(name, value);
        }
        let Some(param) = self.strip_query else {
            return;
        };
        let Some(query) = parts.uri.query() else {
            return;
        };
        let path = parts.uri.path().to_owned();
        let target = match token::strip_query_param(query, &param) {
            Some(query) => format!("{path}?{query}"),
            None => path.clone(),
        };
        // Both targets come from parts of a valid URI, so these cannot fail; if
        // one somehow did, dropping the whole query beats forwarding the token.
        let rebuilt = rebuild_uri(&parts.uri, &target).or_else(|| rebuild_uri(&parts.uri, &path));
        if let Some(uri) = rebuilt {
            parts.uri = uri;
        }
    }
}

/// `uri` with its path and query replaced, keeping scheme and authority (absolute-form).
fn rebuild_uri(uri: &Uri, path_and_query: &str) -> Option<Uri> {
    let mut builder = Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.path_and_query(path_and_query).build().ok()
}

impl JwtAuth {
    fn check(&self, parts: &Parts, now: u64) -> Result<AuthGrant, Rejection> {
        let (token, source) =
            self.locations
                .find(parts)
                .ok_or_else(|| Rejection::TokenMissing {
                    looked_in: self.locations.describe(),
                })?;
        let claims = jwt::verify(&self.keys, &self.rules, &token, now).map_err(|error| {
            Rejection::TokenInvalid {
                detail: error.to_string(),
            }
        })?;
        if let Some(scope) = &self.required_scope {
            if !jwt::has_scope(&claims, scope) {
                return Err(Rejection::ScopeMissing {
                    scope: scope.clone(),
                });
            }
        }
        let mut headers = Vec::with_capacity(self.forward_claims.len());
        for (claim, header) in &self.forward_claims {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            // A value that cannot be a header (control characters) is refused
            // rather than dropped: the backend would read a missing header as
            // "no identity" while the edge said yes.
            let value = HeaderValue::from_str(&jwt::claim_text(value)).map_err(|_| {
                Rejection::TokenInvalid {
                    detail: format!("claim {claim:?} cannot be sent as header {header}"),
                }
            })?;
            headers.push((header.clone(), value));
        }
        let strip_query = (self.strip_token && source == Source::Query)
            .then(|| self.locations.query.clone())
            .flatten();
        Ok(AuthGrant {
            headers,
            strip_query,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests;
