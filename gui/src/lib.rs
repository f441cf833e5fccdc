//! Gleaner's desktop app: a model of the daemon's state and the owner's edits, and its rendering.
//!
//! The GUI is only a client of the daemon's local control API: [`backend`] talks to the socket,
//! [`model`] holds the state and decides (pure, tested without a window), [`view`] draws it, and
//! [`app`] glues them into an eframe application that a script can also drive.

pub mod app;
pub mod backend;
pub mod limits;
pub mod model;
pub mod projects;
pub mod status;
pub mod view;
