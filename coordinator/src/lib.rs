//! The Gleaner coordinator: verifies signed usage records, keeps them durably, computes credit and
//! serves the credit dashboard and API.

pub mod api;
pub mod dashboard;
pub mod ratelimit;
pub mod space;
pub mod store;
pub mod tls;

pub use api::{AppState, app};
