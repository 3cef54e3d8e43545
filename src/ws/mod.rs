//! WebSockets after admission: the exchange with the backend
//! ([`exchange`]), the relay of a backend's refusal ([`refusal`]), the switch
//! on either path ([`upgrade`]) and the byte splice that follows
//! ([`tunnel`]). [`frame`] follows WebSocket frame headers in a byte stream;
//! the tunnel does not use it yet (the frame-aware tunnel builds on it).

pub(crate) mod exchange;
pub(crate) mod extended_connect;
#[allow(dead_code)]
pub(crate) mod frame;
pub(crate) mod refusal;
pub(crate) mod tunnel;
pub(crate) mod upgrade;
