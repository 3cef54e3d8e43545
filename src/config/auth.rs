//! `[route.auth]` validation: raw TOML fields → an [`AuthPolicy`], or every
//! problem found, each with its key path. Keys and secrets are loaded here, so
//! a reload re-reads them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Uri};

use super::raw::RawAuth;
use super::{Problems, resolve};
use crate::headers::forwarding::FORWARDING;
use crate::policy::auth::forward::ForwardAuth;
use crate::policy::auth::jwt::{KeyError, KeySetError, Keys, Rules};
use crate::policy::auth::token::Locations;
use crate::policy::auth::{AuthPolicy, DEFAULT_FORWARD_TIMEOUT, DEFAULT_LEEWAY, JwtAuth, Mode};

/// Headers the proxy itself depends on; letting auth set or strip them would
/// break the request. The forwarding headers ([`FORWARDING`]) are reserved
/// too: the backend reads them as what the proxy vouches for, and a claim
/// written into one would replace the client's address with a user's.
const RESERVED: [&str; 14] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "origin",
    "cookie",
    "authorization",
    "proxy-authorization",
    "wsgate-reason",
];

/// One invalid `[route.auth]` value; the caller pairs it with its key path.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthConfigError {
    #[error("{text:?} is not a header name")]
    NotHeaderName {
        text: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
    #[error("{text:?} is a header the proxy manages; choose another name such as \"X-User-Id\"")]
    ManagedHeader { text: String },
    #[error("{text:?} is not a URL such as \"http://127.0.0.1:9100/check\"")]
    NotUrl {
        text: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(
        "{text:?}: https is not supported for forward auth; use http:// to a nearby auth service"
    )]
    HttpsForward { text: String },
    #[error("{text:?} is not an http:// URL such as \"http://127.0.0.1:9100/check\"")]
    NotHttpUrl { text: String },
    #[error("{text:?} must be longer than zero")]
    ZeroDuration { text: String },
    #[error("{text:?} is not a duration such as \"500ms\", \"30s\" or \"24h\" ({source})")]
    NotDuration {
        text: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("environment variable {var:?} is not set or empty")]
    SecretEnvUnset { var: String },
    #[error("cannot read {}: {source}", .path.display())]
    SecretFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty", .path.display())]
    SecretFileEmpty { path: PathBuf },
    #[error(transparent)]
    PublicKey(#[from] KeyError),
    #[error(transparent)]
    KeySet(#[from] KeySetError),
    #[error("no key source is set")]
    NoKeySource,
}

fn header_name(text: &str) -> Result<HeaderName, AuthConfigError> {
    let name = HeaderName::from_bytes(text.as_bytes()).map_err(|source| {
        AuthConfigError::NotHeaderName {
            text: text.to_owned(),
            source,
        }
    })?;
    if RESERVED.contains(&name.as_str())
        || FORWARDING.contains(&name)
        || name.as_str().starts_with("sec-websocket-")
    {
        return Err(AuthConfigError::ManagedHeader {
            text: text.to_owned(),
        });
    }
    Ok(name)
}

/// Validates `[route.auth]`; `key` is the TOML key path prefix, e.g.
/// `route[2].auth`. Records every problem and returns `None` if any.
/// `base` is the config file's folder (relative paths resolve against it).
pub(super) fn auth_policy(
    raw: &RawAuth,
    base: &Path,
    key: &str,
    problems: &mut Problems,
) -> Option<AuthPolicy> {
    match build(raw, base, key) {
        Ok(policy) => Some(policy),
        Err(found) => {
            for (key, message) in found {
                problems.add(key, message);
            }
            None
        }
    }
}

/// The validation behind [`auth_policy`], as a list of (key, message) so it
/// can be tested on its own.
pub(crate) fn build(
    raw: &RawAuth,
    base: &Path,
    key: &str,
) -> Result<AuthPolicy, Vec<(String, String)>> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut problem = |field: &str, message: String| {
        let path = if field.is_empty() {
            key.to_owned()
        } else {
            format!("{key}.{field}")
        };
        found.push((path, message));
    };

    let key_sources = [
        ("jwt_secret_env", raw.jwt_secret_env.is_some()),
        ("jwt_secret_file", raw.jwt_secret_file.is_some()),
        ("jwt_public_key", raw.jwt_public_key.is_some()),
        ("jwks_file", raw.jwks_file.is_some()),
    ];
    let set: Vec<&str> = key_sources
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();

    let mode = if let Some(url) = &raw.forward {
        for name in &set {
            problem(name, "cannot be combined with `forward`: forward auth and a JWT key are two different modes".into());
        }
        let jwt_only = [
            ("token_query", raw.token_query.is_some()),
            ("token_cookie", raw.token_cookie.is_some()),
            ("required_scope", raw.required_scope.is_some()),
            ("issuer", raw.issuer.is_some()),
            ("audience", raw.audience.is_some()),
            ("leeway", raw.leeway.is_some()),
            ("forward_claims", !raw.forward_claims.is_empty()),
            ("strip_token", raw.strip_token),
        ];
        for (name, _) in jwt_only.iter().filter(|(_, present)| *present) {
            problem(
                name,
                "only applies to JWT checks, not with `forward`".into(),
            );
        }
        let url = parse_forward_url(url)
            .map_err(|error| problem("forward", error.to_string()))
            .ok();
        let timeout = parse_duration(
            raw.forward_timeout.as_deref(),
            DEFAULT_FORWARD_TIMEOUT,
            false,
        )
        .map_err(|error| problem("forward_timeout", error.to_string()))
        .ok();
        let mut copy = Vec::new();
        for (index, name) in raw.forward_response_headers.iter().enumerate() {
            match header_name(name) {
                Ok(name) => copy.push(name),
                Err(error) => problem(
                    &format!("forward_response_headers[{index}]"),
                    error.to_string(),
                ),
            }
        }
        match (url, timeout) {
            (Some(url), Some(timeout)) => Some(Mode::Forward(ForwardAuth::new(url, timeout, copy))),
            _ => None,
        }
    } else {
        for (name, present) in [
            ("forward_timeout", raw.forward_timeout.is_some()),
            (
                "forward_response_headers",
                !raw.forward_response_headers.is_empty(),
            ),
        ] {
            if present {
                problem(name, "only applies with `forward`".into());
            }
        }
        let keys = match set.as_slice() {
            [] => {
                problem(
                    "",
                    "set one key source (jwt_secret_env, jwt_secret_file, jwt_public_key or jwks_file) or `forward`"
                        .into(),
                );
                None
            }
            [_] => load_keys(raw, base)
                .map_err(|(field, error)| problem(field, error.to_string()))
                .ok(),
            [first, rest @ ..] => {
                for name in rest {
                    problem(
                        name,
                        format!("cannot be combined with {first}; set exactly one key source"),
                    );
                }
                None
            }
        };
        let leeway = parse_duration(raw.leeway.as_deref(), DEFAULT_LEEWAY, true)
            .map_err(|error| problem("leeway", error.to_string()))
            .ok();
        let mut nonempty =
            |field: &str, value: &Option<String>| match value.as_deref().map(str::trim) {
                Some("") => {
                    problem(field, "must not be empty".into());
                    None
                }
                other => other.map(str::to_owned),
            };
        let locations = Locations {
            query: nonempty("token_query", &raw.token_query),
            cookie: nonempty("token_cookie", &raw.token_cookie),
        };
        let required_scope = nonempty("required_scope", &raw.required_scope);
        let issuer = nonempty("issuer", &raw.issuer);
        let audience = nonempty("audience", &raw.audience);
        if raw.strip_token && raw.token_query.is_none() {
            problem("strip_token", "only applies with `token_query`".into());
        }
        let mut forward_claims = Vec::new();
        for (claim, header) in &raw.forward_claims {
            match header_name(header) {
                Ok(name) => forward_claims.push((claim.clone(), name)),
                Err(error) => problem(&format!("forward_claims.{claim}"), error.to_string()),
            }
        }
        match (keys, leeway) {
            (Some(keys), Some(leeway)) => Some(Mode::Jwt(JwtAuth {
                keys,
                rules: Rules {
                    issuer,
                    audience,
                    leeway: leeway.as_secs(),
                },
                locations,
                required_scope,
                forward_claims,
                strip_token: raw.strip_token,
            })),
            _ => None,
        }
    };

    match mode {
        None if found.is_empty() => Err(vec![(
            key.to_owned(),
            "is not a valid auth section".to_owned(),
        )]),
        Some(mode) if found.is_empty() => {
            let spoofable = match &mode {
                Mode::Jwt(auth) => auth
                    .forward_claims
                    .iter()
                    .map(|(_, name)| name.clone())
                    .collect(),
                Mode::Forward(auth) => auth.copy_headers().to_vec(),
            };
            Ok(AuthPolicy { mode, spoofable })
        }
        _ => Err(found),
    }
}

/// Loads the one configured key source; the error names its field.
fn load_keys(raw: &RawAuth, base: &Path) -> Result<Keys, (&'static str, AuthConfigError)> {
    if let Some(var) = &raw.jwt_secret_env {
        return match std::env::var_os(var) {
            Some(secret) if !secret.is_empty() => Ok(Keys::secret(secret.as_encoded_bytes())),
            _ => Err((
                "jwt_secret_env",
                AuthConfigError::SecretEnvUnset { var: var.clone() },
            )),
        };
    }
    if let Some(file) = &raw.jwt_secret_file {
        let path = resolve(base, file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(source) => {
                return Err((
                    "jwt_secret_file",
                    AuthConfigError::SecretFileRead { path, source },
                ));
            }
        };
        // Secret files from `echo`/editors end in a newline that is not part of the secret.
        let end = bytes
            .iter()
            .rposition(|&byte| byte != b'\n' && byte != b'\r')
            .map_or(0, |last| last + 1);
        if end == 0 {
            return Err(("jwt_secret_file", AuthConfigError::SecretFileEmpty { path }));
        }
        return Ok(Keys::secret(&bytes[..end]));
    }
    if let Some(file) = &raw.jwt_public_key {
        return Keys::public_key_pem(&resolve(base, file))
            .map_err(|error| ("jwt_public_key", error.into()));
    }
    if let Some(file) = &raw.jwks_file {
        return Keys::jwks_file(&resolve(base, file)).map_err(|error| ("jwks_file", error.into()));
    }
    Err(("", AuthConfigError::NoKeySource))
}

fn parse_forward_url(text: &str) -> Result<Uri, AuthConfigError> {
    let uri: Uri = text.parse().map_err(|source| AuthConfigError::NotUrl {
        text: text.to_owned(),
        source,
    })?;
    let text = text.to_owned();
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(_)) => Ok(uri),
        (Some("https"), _) => Err(AuthConfigError::HttpsForward { text }),
        _ => Err(AuthConfigError::NotHttpUrl { text }),
    }
}

/// Same wording as the rest of the config's durations.
fn parse_duration(
    text: Option<&str>,
    default: Duration,
    zero_ok: bool,
) -> Result<Duration, AuthConfigError> {
    let Some(text) = text else { return Ok(default) };
    match humantime::parse_duration(text) {
        Ok(value) if zero_ok || !value.is_zero() => Ok(value),
        Ok(_) => Err(AuthConfigError::ZeroDuration {
            text: text.to_owned(),
        }),
        Err(source) => Err(AuthConfigError::NotDuration {
            text: text.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn a_bad_duration_keeps_the_parse_error_as_source() {
        let error = parse_duration(Some("soon"), DEFAULT_LEEWAY, true).unwrap_err();
        assert!(
            matches!(error, AuthConfigError::NotDuration { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with("\"soon\" is not a duration"),
            "{error}"
        );
        assert!(error.source().is_some());
    }

    #[test]
    fn header_names_are_typed_problems() {
        assert!(matches!(
            header_name("bad name"),
            Err(AuthConfigError::NotHeaderName { .. })
        ));
        assert!(matches!(
            header_name("X-Forwarded-For"),
            Err(AuthConfigError::ManagedHeader { .. })
        ));
        assert!(header_name("X-User-Id").is_ok());
    }
}
