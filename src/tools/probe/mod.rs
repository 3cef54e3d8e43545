//! `wsgate probe`: diagnose a WebSocket endpoint, wsgate or not, the way
//! the 401/403 debugging checklists do, and say what to fix.
//!
//! The steps, in order, each bounded by `--timeout`: resolve the host;
//! connect; TLS for `wss://` (ALPN, the certificate's names and expiry,
//! the chain checked against the webpki roots); then the upgrade, once per
//! variation a browser or a client might present — the URL's own origin,
//! each `--origin`, no Origin at all, and with `--token` the token as query
//! parameter, cookie and Bearer header — each on a connection of its own
//! with a fresh `Sec-WebSocket-Key`. With `--hold` one more connection
//! stays open and idle to see how the path ends it.
//!
//! Layout: this file holds the flags and runs the steps; `target` reads the
//! URL; `net` resolves, connects and opens the attempts' connections; `tls`
//! does the handshake and describes the certificate; `upgrade` writes an
//! upgrade request and reads the answer (httparse); `frames` is the little
//! of RFC 6455 framing a listening client needs; `hold` is `--hold`;
//! `verdict` turns the steps into a verdict and a fix; `report` is the
//! result, as JSON and as text.

mod frames;
mod hold;
mod net;
mod report;
mod target;
mod tls;
mod upgrade;
mod verdict;

#[cfg(feature = "fuzzing")]
pub(crate) use upgrade::dechunk;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

use frames::{FrameReader, close_politely};
use net::{Conn, Dialer};
use report::{OriginFrom, Report, Steps, TokenPlace, UpgradeStep, millis};
use target::{Target, query_encode};
use upgrade::{Answer, Ask};
use verdict::{Context, Diagnosis, Verdict};

/// Diagnose a WebSocket endpoint: DNS, TCP, TLS, then the upgrade with the
/// URL's own origin, each --origin and none, and with --token in each
/// place; prints the steps, a verdict and the likely fix. Exit 0 only when
/// the verdict is `ok`.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "wsgate probe")]
pub struct ProbeArgs {
    /// ws://host[:port]/path or wss://host[:port]/path.
    pub url: String,

    /// Another Origin to try, e.g. https://app.example.com or null (repeatable);
    /// the verdict is `ok` when it or the URL's own origin upgrades.
    #[arg(long = "origin", value_parser = parse_origin)]
    pub origins: Vec<String>,

    /// A token to try in each place a WebSocket client can put one: the
    /// query parameter --token-query, the cookie --token-cookie and
    /// `Authorization: Bearer`.
    #[arg(long)]
    pub token: Option<String>,

    /// Query parameter for the token (wsgate's `token_query`; the name its
    /// examples use).
    #[arg(long, default_value = "token")]
    pub token_query: String,

    /// Cookie for the token (wsgate's `token_cookie`; the name its examples use).
    #[arg(long, default_value = "session")]
    pub token_cookie: String,

    /// Extra request header 'Name: value' on every attempt (repeatable);
    /// replaces the probe's own of the same name (a Cookie is joined).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,

    /// Accept a certificate that does not verify (still described and reported).
    #[arg(long)]
    pub insecure: bool,

    /// Keep one upgraded connection open and idle this long (e.g. 90s) and
    /// report how it ended: still open, a Close with its code, or a cut (1006).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub hold: Option<Duration>,

    /// Limit for each network step: DNS, connect, TLS, the answer to an upgrade.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Print one JSON object (`verdict`, `fix`, `steps`) instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// Runs the probe and prints its report; exit 0 iff the verdict is `ok`.
pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let report = execute(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.verdict == Verdict::Ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn execute(args: &ProbeArgs) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    if let Some(token) = &args.token
        && (token.is_empty() || HeaderValue::from_str(token).is_err())
    {
        bail!("--token must be non-empty and printable (no control characters)");
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be greater than 0");
    }
    let tls = if target.secure {
        Some(tls::Tls::new(&target.host, args.insecure)?)
    } else {
        None
    };
    let mut steps = Steps {
        dns: net::resolve(&target, args.timeout).await,
        tcp: None,
        tls: None,
        upgrades: Vec::new(),
        hold: None,
    };
    if steps.dns.error.is_none() {
        let (tcp, stream) =
            net::connect_first(&steps.dns.addresses, target.port, args.timeout).await;
        let connected = tcp.connected;
        steps.tcp = Some(tcp);
        if let (Some(stream), Some(addr)) = (stream, connected) {
            let first = match &tls {
                None => Some(Conn::Plain(stream)),
                Some(tls) => {
                    let (step, stream) = tls.first(stream, args.timeout).await;
                    steps.tls = Some(step);
                    stream.map(|stream| Conn::Tls(Box::new(stream)))
                }
            };
            if let Some(first) = first {
                let prober = Prober {
                    target: &target,
                    args,
                    dialer: Dialer {
                        addr,
                        tls,
                        timeout: args.timeout,
                    },
                };
                steps.upgrades = prober.attempts(first).await;
                if let Some(duration) = args.hold {
                    steps.hold = Some(prober.hold(&steps.upgrades, duration).await);
                }
            }
        }
    }
    let cx = Context {
        target: &target,
        token_given: args.token.is_some(),
        token_query: &args.token_query,
        token_cookie: &args.token_cookie,
    };
    let Diagnosis { verdict, fix } = verdict::diagnose(&steps, &cx);
    Ok(Report {
        url: args.url.clone(),
        verdict,
        fix,
        steps,
    })
}

/// One variation of the upgrade request.
#[derive(Clone)]
struct Variant {
    origin: Option<String>,
    origin_from: OriginFrom,
    token_in: Option<TokenPlace>,
}

struct Prober<'a> {
    target: &'a Target,
    args: &'a ProbeArgs,
    dialer: Dialer,
}

impl Prober<'_> {
    /// Every variation, in order; `first` is the connection the TCP and TLS
    /// steps opened, used by the first attempt.
    async fn attempts(&self, first: Conn) -> Vec<UpgradeStep> {
        let own = self.target.own_origin();
        let mut variants = vec![Variant {
            origin: Some(own.clone()),
            origin_from: OriginFrom::Url,
            token_in: None,
        }];
        for origin in &self.args.origins {
            if !variants
                .iter()
                .any(|v| v.origin.as_deref() == Some(origin.as_str()))
            {
                variants.push(Variant {
                    origin: Some(origin.clone()),
                    origin_from: OriginFrom::Flag,
                    token_in: None,
                });
            }
        }
        variants.push(Variant {
            origin: None,
            origin_from: OriginFrom::None,
            token_in: None,
        });
        let mut first = Some(first);
        let mut done = Vec::new();
        for variant in &variants {
            done.push(self.attempt(variant, first.take()).await);
        }
        if self.args.token.is_some() {
            // The token attempts carry an Origin that got past the origin
            // check, if one did, so they test the token and not the origin.
            let carrier = match verdict::origin_for_token(&done) {
                Some(passed) => (passed.origin.clone(), passed.origin_from),
                None => (Some(own), OriginFrom::Url),
            };
            for place in [TokenPlace::Query, TokenPlace::Cookie, TokenPlace::Bearer] {
                let variant = Variant {
                    origin: carrier.0.clone(),
                    origin_from: carrier.1,
                    token_in: Some(place),
                };
                done.push(self.attempt(&variant, None).await);
            }
        }
        done
    }

    async fn attempt(&self, variant: &Variant, conn: Option<Conn>) -> UpgradeStep {
        let mut step = UpgradeStep::new(
            variant.origin.clone(),
            variant.origin_from,
            variant.token_in,
        );
        let start = Instant::now();
        let (mut conn, answer, key) = match self.upgrade(variant, conn).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                step.error = Some(error);
                step.ms = millis(start.elapsed());
                return step;
            }
        };
        step.ms = millis(start.elapsed());
        record(&mut step, &answer, &key);
        if answer.status == 101 {
            let mut reader = FrameReader::new(answer.rest);
            close_politely(&mut conn, &mut reader, hold::CLOSE_WAIT).await;
        } else {
            step.body = upgrade::body_excerpt(&mut conn, &answer, self.args.timeout).await;
        }
        step
    }

    /// Opens a connection (unless given one) and sends the upgrade.
    async fn upgrade(
        &self,
        variant: &Variant,
        conn: Option<Conn>,
    ) -> Result<(Conn, Answer, String), String> {
        let mut conn = match conn {
            Some(conn) => conn,
            None => self.dialer.open().await?,
        };
        let key = upgrade::new_key()
            .map_err(|error| format!("no randomness for a Sec-WebSocket-Key: {error}"))?;
        let head = self.request_head(variant, &key);
        let answer = upgrade::exchange(&mut conn, &head, self.args.timeout).await?;
        Ok((conn, answer, key))
    }

    fn request_head(&self, variant: &Variant, key: &str) -> Vec<u8> {
        let token = self.args.token.as_deref();
        let place = |wanted| token.filter(|_| variant.token_in == Some(wanted));
        let parameter = place(TokenPlace::Query).map(|token| {
            format!(
                "{}={}",
                query_encode(&self.args.token_query),
                query_encode(token)
            )
        });
        let request_target = self.target.request_target(parameter.as_deref());
        let ask = Ask {
            request_target: &request_target,
            host: &self.target.authority,
            origin: variant.origin.as_deref(),
            cookie: place(TokenPlace::Cookie)
                .map(|token| format!("{}={token}", self.args.token_cookie)),
            authorization: place(TokenPlace::Bearer).map(|token| format!("Bearer {token}")),
            extra: &self.args.headers,
        };
        upgrade::request_head(&ask, key)
    }

    /// Repeats the first attempt that upgraded (a browser-origin one if
    /// any) on a new connection and holds that.
    async fn hold(&self, attempts: &[UpgradeStep], duration: Duration) -> report::HoldStep {
        let chosen = attempts
            .iter()
            .find(|a| a.upgraded && a.is_browser())
            .or_else(|| attempts.iter().find(|a| a.upgraded));
        let Some(chosen) = chosen else {
            return hold::Held::failed("no attempt upgraded".to_owned())
                .into_step(duration, None, None);
        };
        let variant = Variant {
            origin: chosen.origin.clone(),
            origin_from: chosen.origin_from,
            token_in: chosen.token_in,
        };
        let held = match self.upgrade(&variant, None).await {
            Err(error) => hold::Held::failed(error),
            Ok((conn, answer, key)) => match answer.switch_problem(&key) {
                Some(problem) if answer.status == 101 => hold::Held::failed(problem),
                _ if answer.status != 101 => hold::Held::failed(format!(
                    "this time the upgrade was answered {} {}",
                    answer.status, answer.status_text
                )),
                _ => {
                    let upgraded_at = Instant::now();
                    hold::hold(conn, answer.rest, upgraded_at, duration, self.args.timeout).await
                }
            },
        };
        held.into_step(duration, variant.origin, variant.token_in)
    }
}

/// Copies what the verdict reads from an answer into its step.
fn record(step: &mut UpgradeStep, answer: &Answer, key: &str) {
    step.status = Some(answer.status);
    step.status_text = Some(answer.status_text.clone()).filter(|text| !text.is_empty());
    step.wsgate_reason = answer.get("wsgate-reason").map(str::to_owned);
    step.www_authenticate = answer.joined("www-authenticate");
    step.retry_after = answer.get("retry-after").map(str::to_owned);
    if answer.status == 101 {
        match answer.switch_problem(key) {
            None => step.upgraded = true,
            Some(problem) => step.problem = Some(problem),
        }
    }
}

fn parse_origin(text: &str) -> Result<String, String> {
    // What browsers send from file:// pages, sandboxed frames and some redirects.
    if text == "null" {
        return Ok(text.to_owned());
    }
    let (scheme, rest) = text.split_once("://").ok_or_else(|| {
        "an origin is scheme://host[:port], e.g. https://app.example.com".to_owned()
    })?;
    if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
        return Err("an origin is scheme://host[:port], with no path".to_owned());
    }
    HeaderValue::from_str(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| "expected 'Name: value'".to_owned())?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
    if name == http::header::ORIGIN {
        return Err("use --origin for Origin: the probe tries each one separately".to_owned());
    }
    if name == http::header::SEC_WEBSOCKET_KEY {
        return Err(
            "the probe makes a fresh Sec-WebSocket-Key per attempt to check the answer".to_owned(),
        );
    }
    let value = HeaderValue::from_str(value.trim()).map_err(|e| e.to_string())?;
    Ok((name, value))
}
