//! Budgeted rank and scale allocation.
//!
//! TODO(helper): implement per the contract below.
