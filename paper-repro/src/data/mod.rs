//! Data: token corpora (text) and image datasets (vision), and the default corpora.
pub mod corpora;
pub mod text;
pub mod vision;
