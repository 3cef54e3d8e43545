//! Programs built on the library, not part of the proxy: `wsgate demo`,
//! `wsgate echo` and `wsgate load`.

pub mod demo;
pub mod echo;
pub mod load;
