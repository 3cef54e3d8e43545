//! From the steps to one verdict and the fix most likely to help.
//!
//! The first failed step decides: DNS, TCP, TLS. Past them, the verdict is
//! about what a browser needs: `ok` when an attempt carrying a browser
//! origin (the URL's own or an `--origin`) upgraded. Otherwise each such
//! attempt's answer is read — by its `wsgate-reason` when it has one,
//! else from its status, its `WWW-Authenticate` challenge and how the
//! attempts that differ from it only in Origin or only in the token
//! fared — and the attempt that got furthest through the usual order of
//! checks (route, IP, limits, shape, origin, token, scope, backend) gives
//! the verdict. A rate limit is the exception: an attempt it refused says
//! nothing about what would have happened next, so one rate-limited
//! browser attempt makes the verdict `rate-limited`.

use std::fmt;

use serde::Serialize;

use super::report::{HoldEnd, HoldStep, OriginFrom, Steps, TlsStep, TokenPlace, UpgradeStep};
use super::target::Target;

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Ok,
    DnsFailed,
    ConnectFailed,
    TlsFailed,
    OriginRejected,
    TokenMissing,
    TokenInvalid,
    ScopeMissing,
    IpForbidden,
    RateLimited,
    NoRoute,
    UpgradeStripped,
    UpstreamDown,
    Unexpected,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::DnsFailed => "dns-failed",
            Verdict::ConnectFailed => "connect-failed",
            Verdict::TlsFailed => "tls-failed",
            Verdict::OriginRejected => "origin-rejected",
            Verdict::TokenMissing => "token-missing",
            Verdict::TokenInvalid => "token-invalid",
            Verdict::ScopeMissing => "scope-missing",
            Verdict::IpForbidden => "ip-forbidden",
            Verdict::RateLimited => "rate-limited",
            Verdict::NoRoute => "no-route",
            Verdict::UpgradeStripped => "upgrade-stripped",
            Verdict::UpstreamDown => "upstream-down",
            Verdict::Unexpected => "unexpected",
        })
    }
}

/// What the fixes may refer to.
pub(super) struct Context<'a> {
    pub target: &'a Target,
    pub token_given: bool,
    pub token_query: &'a str,
    pub token_cookie: &'a str,
}

pub(super) struct Diagnosis {
    pub verdict: Verdict,
    pub fix: String,
}

/// How far one attempt got and what it means.
struct Reading {
    verdict: Verdict,
    /// Position in the order of checks; higher got further.
    stage: i32,
    /// The fix, when the verdict alone does not say enough (`unexpected`).
    note: Option<String>,
}

impl Reading {
    fn new(verdict: Verdict, stage: i32) -> Reading {
        Reading {
            verdict,
            stage,
            note: None,
        }
    }

    fn unexpected(stage: i32, note: String) -> Reading {
        Reading {
            verdict: Verdict::Unexpected,
            stage,
            note: Some(note),
        }
    }
}

// Stages, in the order wsgate (and most servers) check.
const NO_ANSWER: i32 = -1;
const ROUTE: i32 = 0;
const IP: i32 = 1;
const LIMITS: i32 = 2;
const SHAPE: i32 = 3;
const ORIGIN: i32 = 4;
const TOKEN_MISSING: i32 = 5;
const TOKEN_INVALID: i32 = 6;
const SCOPE: i32 = 7;
const PAST_POLICY: i32 = 8;
const BACKEND: i32 = 9;
const SWITCHED: i32 = 10;

pub(super) fn diagnose(steps: &Steps, cx: &Context<'_>) -> Diagnosis {
    let done = |verdict, fix: String| Diagnosis { verdict, fix };
    if let Some(error) = &steps.dns.error {
        return done(
            Verdict::DnsFailed,
            format!(
                "{} does not resolve ({error}): check the host name and its DNS records (or /etc/hosts).",
                cx.target.host
            ),
        );
    }
    let connected = steps.tcp.as_ref().and_then(|tcp| tcp.connected);
    if connected.is_none() {
        let why = steps
            .tcp
            .as_ref()
            .and_then(|tcp| tcp.failed.first())
            .map_or_else(|| "no address".to_owned(), |f| f.error.clone());
        return done(
            Verdict::ConnectFailed,
            format!(
                "nothing accepts connections on port {} of {} ({why}): start the server, or check the port and the firewalls in between.",
                cx.target.port, cx.target.host
            ),
        );
    }
    if let Some(tls) = steps.tls.as_ref().filter(|tls| !tls.ok) {
        return done(Verdict::TlsFailed, tls_fix(tls, cx));
    }
    let attempts = &steps.upgrades;
    let browser: Vec<&UpgradeStep> = attempts.iter().filter(|a| a.is_browser()).collect();
    if let Some(upgraded) = browser.iter().find(|a| a.upgraded) {
        let fix = match steps.hold.as_ref().and_then(hold_fix) {
            Some(fix) => fix,
            None => ok_fix(upgraded, attempts),
        };
        return done(Verdict::Ok, fix);
    }
    if let Some(limited) = browser.iter().find(|a| rate_limited(a)) {
        return done(Verdict::RateLimited, rate_fix(limited, attempts.len()));
    }
    let mut best: Option<(&UpgradeStep, Reading)> = None;
    for attempt in browser {
        let reading = interpret(attempt, attempts);
        if best.as_ref().is_none_or(|(_, b)| reading.stage > b.stage) {
            best = Some((attempt, reading));
        }
    }
    let Some((attempt, reading)) = best else {
        return done(
            Verdict::Unexpected,
            "no upgrade was attempted with a browser origin.".to_owned(),
        );
    };
    let fix = match reading.note {
        Some(note) => note,
        None => fix_for(reading.verdict, attempt, attempts, cx),
    };
    done(reading.verdict, fix)
}

/// The first browser-origin attempt that got past the origin check; the
/// token attempts carry its Origin, so they test the token rather than
/// meet the same origin refusal again. `None`: none did.
pub(super) fn origin_for_token(attempts: &[UpgradeStep]) -> Option<&UpgradeStep> {
    attempts
        .iter()
        .filter(|a| a.is_browser() && a.token_in.is_none())
        .find(|a| interpret(a, attempts).stage > ORIGIN)
}

fn rate_limited(attempt: &UpgradeStep) -> bool {
    match attempt.wsgate_reason.as_deref() {
        Some(reason) => matches!(reason, "rate-limited" | "too-many-connections"),
        None => attempt.status == Some(429),
    }
}

fn interpret(attempt: &UpgradeStep, all: &[UpgradeStep]) -> Reading {
    if let Some(error) = &attempt.error {
        return Reading::unexpected(
            NO_ANSWER,
            format!(
                "the server accepted the connection but the upgrade got no answer ({error}): check that it speaks HTTP/1.1 on this port and that whatever it proxies to is up."
            ),
        );
    }
    let status = attempt.status.unwrap_or(0);
    if let Some(reason) = &attempt.wsgate_reason {
        return by_reason(reason, status, attempt);
    }
    let challenge = Challenge::parse(attempt.www_authenticate.as_deref());
    match status {
        101 => Reading::unexpected(
            SWITCHED,
            format!(
                "the server switched protocols but {}: a client library would drop this connection; fix the server or the intermediary that alters the handshake.",
                attempt.problem.as_deref().unwrap_or("the handshake is incomplete")
            ),
        ),
        401 => match (attempt.token_in, challenge.error.as_deref()) {
            (_, Some("invalid_token")) => Reading::new(Verdict::TokenInvalid, TOKEN_INVALID),
            (None, _) => Reading::new(Verdict::TokenMissing, TOKEN_MISSING),
            // RFC 6750 §3.1: a challenge without an error code means the
            // server saw no credentials at all.
            (Some(_), None) if challenge.bearer => {
                Reading::new(Verdict::TokenMissing, TOKEN_MISSING)
            }
            (Some(_), _) => Reading::new(Verdict::TokenInvalid, TOKEN_INVALID),
        },
        403 if challenge.error.as_deref() == Some("insufficient_scope") => {
            Reading::new(Verdict::ScopeMissing, SCOPE)
        }
        403 if challenge.error.as_deref() == Some("invalid_token") => {
            Reading::new(Verdict::TokenInvalid, TOKEN_INVALID)
        }
        // Known but not allowed: without the token the same origin got
        // "who are you?", with it "no".
        403 if attempt.token_in.is_some() && same_origin_untokened_got(attempt, all, 401) => {
            Reading::new(Verdict::ScopeMissing, SCOPE)
        }
        404 => Reading::new(Verdict::NoRoute, ROUTE),
        429 => Reading::new(Verdict::RateLimited, LIMITS),
        _ if origin_mattered(attempt, all) => Reading::new(Verdict::OriginRejected, ORIGIN),
        403 => Reading::unexpected(
            ORIGIN,
            "a bare 403 whatever the Origin and token: if the server checks Origin, probe with --origin set to the page's origin; otherwise an IP allowlist, a WAF or another policy refuses — its body and logs say which.".to_owned(),
        ),
        502..=504 => Reading::new(Verdict::UpstreamDown, BACKEND),
        200..=399 | 400 | 426 => Reading::new(Verdict::UpgradeStripped, BACKEND),
        _ => Reading::unexpected(
            BACKEND,
            format!(
                "the server answered the upgrade with {status} {}: its body and logs say why.",
                attempt.status_text.as_deref().unwrap_or("")
            ),
        ),
    }
}

/// wsgate's reason codes (CONTRACT.md, "Status codes and reasons").
fn by_reason(reason: &str, status: u16, attempt: &UpgradeStep) -> Reading {
    match reason {
        "no-route" => Reading::new(Verdict::NoRoute, ROUTE),
        "ip-forbidden" => Reading::new(Verdict::IpForbidden, IP),
        "rate-limited" | "too-many-connections" => Reading::new(Verdict::RateLimited, LIMITS),
        // wsgate saw a plain request: something in front of it dropped Upgrade.
        "upgrade-required" => Reading::new(Verdict::UpgradeStripped, SHAPE),
        "origin-forbidden" | "origin-missing" => Reading::new(Verdict::OriginRejected, ORIGIN),
        "token-missing" => Reading::new(Verdict::TokenMissing, TOKEN_MISSING),
        "token-invalid" => Reading::new(Verdict::TokenInvalid, TOKEN_INVALID),
        "scope-missing" => Reading::new(Verdict::ScopeMissing, SCOPE),
        // The forward-auth service's own 401/403.
        "auth-denied" if status == 403 => Reading::new(Verdict::ScopeMissing, SCOPE),
        "auth-denied" if attempt.token_in.is_some() => {
            Reading::new(Verdict::TokenInvalid, TOKEN_INVALID)
        }
        "auth-denied" => Reading::new(Verdict::TokenMissing, TOKEN_MISSING),
        "auth-unavailable" => Reading::new(Verdict::UpstreamDown, PAST_POLICY),
        "upstream-unavailable" | "upstream-timeout" => Reading::new(Verdict::UpstreamDown, BACKEND),
        "websocket-forbidden" => Reading::unexpected(
            SHAPE,
            "the route refuses WebSockets (websocket = \"forbidden\"): point the URL at a WebSocket route, or allow upgrades on this one.".to_owned(),
        ),
        "bad-handshake" | "bad-version" => Reading::unexpected(
            SHAPE,
            format!(
                "the server saw a broken handshake ({reason}) although the probe sent a valid one: an intermediary rewrites Sec-WebSocket-Key or -Version; forward them unchanged."
            ),
        ),
        "header-too-large" => Reading::unexpected(
            SHAPE,
            "the request head is larger than the server's max_header_bytes: send fewer or smaller headers (cookies, --header), or raise the limit.".to_owned(),
        ),
        "subprotocol-forbidden" => Reading::unexpected(
            PAST_POLICY,
            "the route only accepts certain subprotocols: offer one of its `subprotocols` with --header 'Sec-WebSocket-Protocol: NAME'.".to_owned(),
        ),
        "upstream-protocol" => Reading::unexpected(
            BACKEND,
            "the backend's 101 selected a subprotocol the client did not offer (or a wrong Sec-WebSocket-Accept): fix the backend's handshake.".to_owned(),
        ),
        "overloaded" => Reading::unexpected(
            LIMITS,
            "the proxy is at its max_connections: add capacity or raise the limit.".to_owned(),
        ),
        other => Reading::unexpected(
            BACKEND,
            format!("the server refused with wsgate-reason {other}: its body and logs say why."),
        ),
    }
}

/// Another Origin (or none), same token place, and the server let it
/// further: the Origin made the difference.
fn origin_mattered(attempt: &UpgradeStep, all: &[UpgradeStep]) -> bool {
    all.iter().any(|other| {
        other.token_in == attempt.token_in
            && other.origin != attempt.origin
            && other.error.is_none()
            && (other.upgraded || (attempt.status == Some(403) && other.status == Some(401)))
    })
}

fn same_origin_untokened_got(attempt: &UpgradeStep, all: &[UpgradeStep], status: u16) -> bool {
    all.iter().any(|other| {
        other.token_in.is_none() && other.origin == attempt.origin && other.status == Some(status)
    })
}

/// The parts of an RFC 6750 challenge the verdict needs.
struct Challenge {
    bearer: bool,
    error: Option<String>,
}

impl Challenge {
    fn parse(header: Option<&str>) -> Challenge {
        let Some(header) = header else {
            return Challenge {
                bearer: false,
                error: None,
            };
        };
        let bearer = header
            .split(',')
            .any(|part| part.trim().to_ascii_lowercase().starts_with("bearer"));
        let error = header.split([',', ' ']).find_map(|param| {
            let (name, value) = param.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("error")
                .then(|| value.trim().trim_matches('"').to_owned())
        });
        Challenge { bearer, error }
    }
}

fn describe(attempt: &UpgradeStep) -> String {
    let origin = match (attempt.origin_from, &attempt.origin) {
        (OriginFrom::Url, Some(origin)) => format!("the URL's own origin {origin}"),
        (OriginFrom::Flag, Some(origin)) => format!("--origin {origin}"),
        _ => "no Origin".to_owned(),
    };
    match attempt.token_in {
        None => origin,
        Some(TokenPlace::Query) => format!("{origin} and the token in the query"),
        Some(TokenPlace::Cookie) => format!("{origin} and the token in a cookie"),
        Some(TokenPlace::Bearer) => format!("{origin} and the token as a Bearer header"),
    }
}

fn answer(attempt: &UpgradeStep) -> String {
    let status = attempt.status.map(|s| s.to_string()).unwrap_or_default();
    match &attempt.wsgate_reason {
        Some(reason) => format!("{status} {reason}"),
        None => format!("{status} {}", attempt.status_text.as_deref().unwrap_or(""))
            .trim_end()
            .to_owned(),
    }
}

fn ok_fix(upgraded: &UpgradeStep, attempts: &[UpgradeStep]) -> String {
    let own_refused = attempts
        .iter()
        .find(|a| a.origin_from == OriginFrom::Url && a.token_in.is_none())
        .filter(|own| !own.upgraded);
    match own_refused {
        Some(own) if upgraded.origin_from == OriginFrom::Flag => format!(
            "nothing to fix: {} upgraded (the URL's own origin got {}, which matters only if pages on that host open this WebSocket).",
            describe(upgraded),
            answer(own)
        ),
        _ => format!("nothing to fix: {} upgraded.", describe(upgraded)),
    }
}

/// After an upgrade that worked, what the held connection showed, if it
/// ended early: the checklist's "after the handshake: 1006".
fn hold_fix(hold: &HoldStep) -> Option<String> {
    let after = format!("{:.1} s", hold.after_ms.unwrap_or(0.0) / 1000.0);
    match hold.ended {
        HoldEnd::Cut => Some(format!(
            "the handshake is fine, but the idle connection was cut without a Close frame after {after} (a browser reports 1006): something on the path drops idle connections (nginx's proxy_read_timeout is 60 s by default) — raise that timeout, or have the server send pings."
        )),
        HoldEnd::Close => {
            let code = hold.code.unwrap_or(1005);
            let reason = match hold.close_reason.as_deref() {
                Some(reason) if !reason.is_empty() => format!(" ({reason})"),
                _ => String::new(),
            };
            Some(format!(
                "the handshake is fine; the server closed the idle connection with {code}{reason} after {after}: if clients stay idle longer, raise the server's idle timeout (wsgate: the route's idle_timeout) or have them send messages or pings."
            ))
        }
        HoldEnd::Open | HoldEnd::Failed => None,
    }
}

fn rate_fix(limited: &UpgradeStep, count: usize) -> String {
    let retry = limited
        .retry_after
        .as_deref()
        .map(|s| format!(", Retry-After {s} s"))
        .unwrap_or_default();
    format!(
        "the server limits upgrades per client ({}{retry}) and the probe's {count} attempts tripped it: probe again once it allows more (with fewer --origin values), or raise the limit (wsgate: the route's handshake_rate / max_connections_per_ip).",
        answer(limited)
    )
}

fn fix_for(
    verdict: Verdict,
    attempt: &UpgradeStep,
    all: &[UpgradeStep],
    cx: &Context<'_>,
) -> String {
    let origin = attempt.origin.as_deref().unwrap_or("");
    match verdict {
        Verdict::OriginRejected if attempt.wsgate_reason.as_deref() == Some("origin-missing") => format!(
            "the probe sent Origin {origin} but the server saw none: a proxy in between strips it; forward Origin unchanged."
        ),
        Verdict::OriginRejected => {
            let without = all
                .iter()
                .any(|a| a.origin_from == OriginFrom::None && interpret(a, all).stage > ORIGIN);
            let contrast = if without {
                " (a request without Origin gets further: the allowlist, not the route, refuses)"
            } else {
                ""
            };
            format!(
                "the server refuses the Origin {origin}{contrast}: add it exactly as sent (scheme, host and port) to the allowlist (wsgate: the route's `origins`), or probe with --origin set to the origin of the pages that connect."
            )
        }
        Verdict::TokenMissing if cx.token_given => format!(
            "the server found the token in none of the places tried (query parameter `{}`, cookie `{}`, Authorization: Bearer): send it where the server looks (wsgate: the route's token_query / token_cookie; probe: --token-query / --token-cookie).",
            cx.token_query, cx.token_cookie
        ),
        Verdict::TokenMissing => "the server wants a token: probe again with --token; browsers cannot set headers on a WebSocket, so send it in the query string or a cookie (a Bearer header works from other clients).".to_owned(),
        Verdict::TokenInvalid => "the server refuses the token (expired, not yet valid, malformed, or signed with another key, issuer or audience): fetch a fresh one, check its claims, and URL-encode it in a query string.".to_owned(),
        Verdict::ScopeMissing => "the token is valid but lacks the scope the route requires: grant that scope to the token (wsgate: the route's required_scope names it).".to_owned(),
        Verdict::IpForbidden => "the server refuses this client's IP address: allow it (wsgate: the route's allow_ips / deny_ips; behind a proxy, list the proxy in trusted_proxies so the real client IP is checked).".to_owned(),
        Verdict::NoRoute => format!(
            "nothing is served at {}{} ({}): check the URL's host and path (wsgate's route paths match on segment boundaries), or add a route for them.",
            cx.target.authority, cx.target.path, answer(attempt)
        ),
        Verdict::UpgradeStripped if attempt.wsgate_reason.is_some() => "wsgate received the request without Upgrade: a proxy in front of it drops the upgrade headers; forward them (nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\").".to_owned(),
        Verdict::UpgradeStripped => format!(
            "the upgrade was answered as a plain HTTP request ({}): an intermediary drops Upgrade/Connection; forward them (nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\").",
            answer(attempt)
        ),
        Verdict::UpstreamDown if attempt.wsgate_reason.as_deref() == Some("auth-unavailable") => "the forward-auth service is down or answers wrongly: the server's problem, not the client's — restart or fix the auth service.".to_owned(),
        Verdict::UpstreamDown => format!(
            "the proxy reached no working backend ({}): start the backend, or fix the upstream's server addresses.",
            answer(attempt)
        ),
        Verdict::RateLimited => rate_fix(attempt, all.len()),
        Verdict::Ok
        | Verdict::DnsFailed
        | Verdict::ConnectFailed
        | Verdict::TlsFailed
        | Verdict::Unexpected => format!("the server answered {}: its body and logs say why.", answer(attempt)),
    }
}

fn tls_fix(tls: &TlsStep, cx: &Context<'_>) -> String {
    let error = tls.error.as_deref().unwrap_or("");
    if let Some(cert) = &tls.certificate {
        if !cert.covers_host {
            return format!(
                "the certificate is for {}, not {}: serve one that names {} (or probe with --insecure to look past it).",
                if cert.names.is_empty() {
                    "no name".to_owned()
                } else {
                    cert.names.join(", ")
                },
                cx.target.host,
                cx.target.host
            );
        }
        if cert.days_left < 0 {
            return format!("the certificate expired on {}: renew it.", cert.not_after);
        }
        if let Some(verify) = &tls.verify_error {
            return format!(
                "the certificate is not trusted ({verify}): serve the full chain up to a public root, or probe a test certificate with --insecure."
            );
        }
    }
    // No certificate arrived: the handshake broke before it.
    if ["corrupt message", "InvalidContentType", "handshake eof"]
        .iter()
        .any(|sign| error.contains(sign))
    {
        return format!(
            "the server did not answer the TLS handshake ({error}): it may not speak TLS on this port — try ws:// instead of wss://."
        );
    }
    format!("the TLS handshake failed ({error}): check the server's certificate and TLS versions.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::probe::report::{DnsStep, TcpStep};

    fn attempt(origin_from: OriginFrom, token_in: Option<TokenPlace>, status: u16) -> UpgradeStep {
        let origin = match origin_from {
            OriginFrom::Url => Some("http://h".to_owned()),
            OriginFrom::Flag => Some("https://app.test".to_owned()),
            OriginFrom::None => None,
        };
        let mut step = UpgradeStep::new(origin, origin_from, token_in);
        step.status = Some(status);
        step.upgraded = status == 101;
        step
    }

    fn verdict_of(upgrades: Vec<UpgradeStep>, token_given: bool) -> Verdict {
        let target = Target::parse("ws://h/ws").unwrap();
        let steps = Steps {
            dns: DnsStep {
                host: "h".into(),
                addresses: vec!["127.0.0.1".parse().unwrap()],
                ms: 0.0,
                error: None,
            },
            tcp: Some(TcpStep {
                connected: Some("127.0.0.1:80".parse().unwrap()),
                ms: 0.0,
                failed: vec![],
            }),
            tls: None,
            upgrades,
            hold: None,
        };
        let cx = Context {
            target: &target,
            token_given,
            token_query: "token",
            token_cookie: "session",
        };
        diagnose(&steps, &cx).verdict
    }

    use OriginFrom::{Flag, None as NoOrigin, Url};

    #[test]
    fn a_bare_403_that_another_origin_passes_is_the_origin() {
        let upgrades = vec![attempt(Url, None, 403), attempt(NoOrigin, None, 101)];
        assert_eq!(verdict_of(upgrades, false), Verdict::OriginRejected);
        let upgrades = vec![attempt(Url, None, 403), attempt(NoOrigin, None, 401)];
        assert_eq!(verdict_of(upgrades, false), Verdict::OriginRejected);
        let upgrades = vec![attempt(Url, None, 403), attempt(NoOrigin, None, 403)];
        assert_eq!(verdict_of(upgrades, false), Verdict::Unexpected);
    }

    #[test]
    fn an_origin_given_that_upgrades_is_ok_even_if_the_own_one_is_refused() {
        let upgrades = vec![
            attempt(Url, None, 403),
            attempt(Flag, None, 101),
            attempt(NoOrigin, None, 403),
        ];
        assert_eq!(verdict_of(upgrades, false), Verdict::Ok);
        // Only the origin-less request passing is not what a browser needs.
        let upgrades = vec![attempt(Url, None, 403), attempt(NoOrigin, None, 101)];
        assert_ne!(verdict_of(upgrades, false), Verdict::Ok);
    }

    #[test]
    fn tokens_are_judged_by_status_challenge_and_difference() {
        let challenged = |mut step: UpgradeStep, challenge: &str| {
            step.www_authenticate = Some(challenge.to_owned());
            step
        };
        let tokened = |status| {
            vec![
                attempt(Url, None, 401),
                attempt(Url, Some(TokenPlace::Query), status),
                attempt(Url, Some(TokenPlace::Cookie), status),
                attempt(Url, Some(TokenPlace::Bearer), status),
            ]
        };
        assert_eq!(
            verdict_of(vec![attempt(Url, None, 401)], false),
            Verdict::TokenMissing
        );
        assert_eq!(verdict_of(tokened(403), true), Verdict::ScopeMissing);
        assert_eq!(verdict_of(tokened(401), true), Verdict::TokenInvalid);
        let mut upgrades = tokened(401);
        for step in &mut upgrades {
            *step = challenged(step.clone(), "Bearer realm=\"x\"");
        }
        assert_eq!(verdict_of(upgrades.clone(), true), Verdict::TokenMissing);
        upgrades[3] = challenged(upgrades[3].clone(), "Bearer error=\"invalid_token\"");
        assert_eq!(verdict_of(upgrades, true), Verdict::TokenInvalid);
        let scope = challenged(
            attempt(Url, None, 403),
            "Bearer error=\"insufficient_scope\"",
        );
        assert_eq!(verdict_of(vec![scope], false), Verdict::ScopeMissing);
    }

    #[test]
    fn plain_http_answers_to_an_upgrade_mean_it_was_stripped() {
        for status in [200, 301, 400, 426] {
            let upgrades = vec![attempt(Url, None, status), attempt(NoOrigin, None, status)];
            assert_eq!(
                verdict_of(upgrades, false),
                Verdict::UpgradeStripped,
                "{status}"
            );
        }
        for (status, verdict) in [
            (404, Verdict::NoRoute),
            (429, Verdict::RateLimited),
            (502, Verdict::UpstreamDown),
            (500, Verdict::Unexpected),
        ] {
            assert_eq!(
                verdict_of(vec![attempt(Url, None, status)], false),
                verdict,
                "{status}"
            );
        }
    }

    #[test]
    fn a_rate_limited_browser_attempt_masks_what_the_others_said() {
        let mut limited = attempt(Flag, None, 429);
        limited.wsgate_reason = Some("rate-limited".into());
        let mut forbidden = attempt(Url, None, 403);
        forbidden.wsgate_reason = Some("origin-forbidden".into());
        assert_eq!(
            verdict_of(vec![forbidden.clone(), limited], false),
            Verdict::RateLimited
        );
        // A rate-limited origin-less attempt says nothing about browsers.
        let mut limited = attempt(NoOrigin, None, 429);
        limited.wsgate_reason = Some("rate-limited".into());
        assert_eq!(
            verdict_of(vec![forbidden, limited], false),
            Verdict::OriginRejected
        );
    }

    #[test]
    fn the_attempt_that_got_furthest_gives_the_verdict() {
        let reasoned = |origin_from, token_in, status, reason: &str| {
            let mut step = attempt(origin_from, token_in, status);
            step.wsgate_reason = Some(reason.to_owned());
            step
        };
        let upgrades = vec![
            reasoned(Url, None, 403, "origin-forbidden"),
            reasoned(Flag, None, 401, "token-missing"),
            reasoned(NoOrigin, None, 403, "origin-missing"),
            reasoned(Flag, Some(TokenPlace::Query), 403, "scope-missing"),
        ];
        assert_eq!(
            origin_for_token(&upgrades).map(|a| a.origin_from),
            Some(Flag)
        );
        assert_eq!(verdict_of(upgrades, true), Verdict::ScopeMissing);
        let upgrades = vec![reasoned(Url, None, 426, "upgrade-required")];
        assert_eq!(verdict_of(upgrades, false), Verdict::UpgradeStripped);
    }
}
