//! Adapter directories in PEFT's layout.
//!
//! TODO(helper): implement per the contract below.
