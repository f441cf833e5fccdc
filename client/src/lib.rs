//! The Gleaner client: the factory daemon and the `gleaner` CLI, over the sans-IO core.

pub mod batch;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod control;
pub mod coordinator_client;
pub mod daemon;
pub mod daemon_cli;
pub mod demo;
pub mod doctor;
pub mod evdev;
pub mod factory;
pub mod hostbench;
pub mod image_archive;
pub mod keys;
pub mod ledger;
pub mod mjf;
pub mod outbox;
pub mod owner;
pub mod p2p;
pub mod pauses;
pub mod pinning;
pub mod publish;
pub mod render;
pub mod runtime;
pub mod trust;
