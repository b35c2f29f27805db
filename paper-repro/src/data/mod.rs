//! Data: token corpora ([`text`]), image datasets ([`vision`]), the default corpora's sources
//! ([`corpora`]), their preparation ([`defaults`]) and the smoke tier's embedded files ([`embedded`]).

pub mod corpora;
pub mod defaults;
pub mod embedded;
pub mod text;
pub mod vision;
