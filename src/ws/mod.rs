//! WebSockets after admission: the upgrade request as read off the wire
//! ([`request`]), the exchange with the backend ([`exchange`]), the relay of
//! a backend's refusal ([`refusal`]), the switch on either path
//! ([`upgrade`]) and the byte splice that follows ([`tunnel`]), which
//! follows the frames in both directions ([`frame`]).

pub(crate) mod exchange;
#[allow(dead_code)]
pub(crate) mod frame;
pub(crate) mod refusal;
pub(crate) mod request;
pub(crate) mod tunnel;
pub(crate) mod upgrade;
