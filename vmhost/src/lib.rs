//! `gleaner-vmhost`: the libvirt runtime (`libvirt.rs`) and the loop that serves it to the daemon
//! over a pipe (`serve.rs`), so that libvirt's libraries are mapped only while VMs need them.

pub mod libvirt;
pub mod serve;
