//! Programs built on the library, not part of the proxy: `wsgate demo`,
//! `wsgate echo`, `wsgate load` and `wsgate probe`.

pub mod demo;
pub mod echo;
pub mod load;
pub mod probe;
