//! The executable's and its libraries' start-up pages let go once the daemon is idle (docs/BENCHMARKS.md, idle footprint).
//!
//! Start-up (command line, settings, engine probes, the host benchmark, libp2p set-up) touches
//! most of the `gleaner` binary once, and the kernel keeps every page it mapped — plus up to 16
//! neighbours of each faulting page (fault-around) — in the process's resident set until memory
//! pressure reclaims them. The same goes for the shared libraries (libc, libm, the loader,
//! libgcc_s): start-up (the host benchmark's floating point, for one) maps pages of them that an
//! idle loop never runs. An idle daemon needs a small part of that. [`release_executable_pages`]
//! drops the page-table entries of the process's read-only private file mappings
//! (`MADV_DONTNEED`: the executable and its libraries), once, when the daemon has gone idle; the
//! pages the idle loop uses fault back in from the page cache (minor faults, no disk read while
//! the cache holds them). The libraries' pages stay in the page cache, shared with every other
//! process using them: only this process's mappings of them go.
//!
//! Fault-around would undo most of that: a fault on a file mapping maps up to 16 neighbouring
//! pages that are in the page cache (`fault_around_bytes`, global), and read-around on a page-cache
//! miss reads 32 more. So the advised mappings are also marked `MADV_RANDOM` (no read-around on a
//! miss) and the executable's page-cache pages no process maps are dropped
//! (`POSIX_FADV_DONTNEED`: clean pages, read back from disk if needed; pages other processes map
//! are kept). The libraries' page cache is left alone: other processes use it. The idle loop then reads back, page by page, only what it runs. When work starts,
//! [`restore_readahead`] takes `MADV_RANDOM` off so a machine's start reads code ahead again, and
//! asks the kernel to read the executable back into the page cache (`MADV_WILLNEED`, asynchronous):
//! the code that freezes machines when the owner returns may not have run since the release, and
//! its first run must cost minor faults (microseconds), never disk reads.
//!
//! Why `MADV_DONTNEED` and not `MADV_PAGEOUT` or `MADV_COLD`: the kernel pages out file pages only
//! for a process that owns the file or may write it (`can_do_file_pageout` in mm/madvise.c: a
//! side-channel guard), so for a daemon running as its own user or the desktop user on a root-owned
//! `/usr/bin/gleaner` `MADV_PAGEOUT` succeeds and does nothing; `MADV_COLD` only ages the pages on
//! the LRU and leaves them mapped. `MADV_DONTNEED` on a private file mapping discards the
//! process's view of the pages: safe exactly when no page of the range was ever copied on write
//! (then the file's pages are what comes back, as they would be for a page never touched). So
//! only file mappings that are private, not writable and hold no anonymous page are advised —
//! never relro (relocated, copied), `.data`/`.bss`, the heap, stacks or shared mappings.

use std::io;
use std::os::unix::fs::MetadataExt;

/// One file mapping that may be let go: its address range, resident KiB and whether it maps the
/// executable itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub start: usize,
    pub end: usize,
    pub rss_kib: u64,
    pub exe: bool,
}

/// What [`release_executable_pages`] let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings advised.
    pub mappings: usize,
    /// Their resident KiB before the advice (what the process stopped holding).
    pub kib: u64,
    /// Of which the executable's own.
    pub exe_kib: u64,
    /// File mappings left alone: writable, shared, or holding copied-on-write pages.
    pub kept: usize,
}

/// The executable's file: device (major, minor) and inode, as `/proc/PID/smaps` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
}

impl FileId {
    /// The running executable (`/proc/self/exe`, which still resolves after the file was
    /// replaced on disk, as a package upgrade does).
    pub fn of_self() -> io::Result<FileId> {
        let m = std::fs::metadata("/proc/self/exe")?;
        let dev = m.dev();
        // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
        let major = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32;
        let minor = ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32;
        Ok(FileId {
            major,
            minor,
            inode: m.ino(),
        })
    }
}

/// The file mappings in an smaps text that may be let go (read-only private file mappings with no
/// anonymous page), marked when they map `exe`, and how many file mappings are kept. Lines that
/// do not parse are skipped: a mapping whose header cannot be read is never a candidate.
pub fn candidates(smaps: &str, exe: FileId) -> (Vec<Candidate>, usize) {
    struct Current {
        start: usize,
        end: usize,
        eligible: bool,
        exe: bool,
        rss: u64,
        anon: Option<u64>,
    }
    let mut out = Vec::new();
    let mut kept = 0;
    let mut cur: Option<Current> = None;
    let mut finish = |c: Option<Current>, out: &mut Vec<Candidate>| {
        if let Some(c) = c {
            // Only a mapping whose Anonymous line was read and is zero.
            if c.eligible && c.anon == Some(0) {
                out.push(Candidate {
                    start: c.start,
                    end: c.end,
                    rss_kib: c.rss,
                    exe: c.exe,
                });
            } else {
                kept += 1;
            }
        }
    };
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-')
            && !first.ends_with(':')
        {
            let header = (|| {
                let start = usize::from_str_radix(a, 16).ok()?;
                let end = usize::from_str_radix(b, 16).ok()?;
                let perms = f.next()?;
                let _offset = f.next()?;
                let (maj, min) = f.next()?.split_once(':')?;
                let major = u32::from_str_radix(maj, 16).ok()?;
                let minor = u32::from_str_radix(min, 16).ok()?;
                let inode: u64 = f.next()?.parse().ok()?;
                Some((
                    start,
                    end,
                    perms.to_owned(),
                    FileId {
                        major,
                        minor,
                        inode,
                    },
                ))
            })();
            let prev = cur.take();
            match header {
                // inode 0: anonymous memory, the heap, stacks, [vdso] and the like.
                Some((start, end, perms, id)) if id.inode != 0 => {
                    finish(prev, &mut out);
                    let p = perms.as_bytes();
                    let eligible =
                        p.len() == 4 && p[0] == b'r' && p[1] == b'-' && p[3] == b'p' && end > start;
                    cur = Some(Current {
                        start,
                        end,
                        eligible,
                        exe: id == exe,
                        rss: 0,
                        anon: None,
                    });
                }
                _ => {
                    // Another mapping (or one we cannot read): ends the executable's current one.
                    finish(prev, &mut out);
                }
            }
            continue;
        }
        if let Some(c) = cur.as_mut() {
            let value = f.next().and_then(|v| v.parse::<u64>().ok());
            match first {
                "Rss:" => c.rss = value.unwrap_or(0),
                "Anonymous:" => c.anon = value,
                _ => {}
            }
        }
    }
    finish(cur.take(), &mut out);
    (out, kept)
}

/// Lets go of the resident pages of this process's executable and libraries that can come back
/// unchanged from their files (see the module docs). Meant to be called once when the daemon goes idle; it reads
/// `/proc/self/smaps` once and makes one `madvise` call per mapping (a handful). Errors say which
/// step failed; a kernel refusing the advice is one (the caller logs it and carries on).
pub fn release_executable_pages() -> io::Result<Released> {
    let (found, kept) = own_candidates()?;
    let mut released = Released {
        mappings: 0,
        kib: 0,
        exe_kib: 0,
        kept,
    };
    for c in &found {
        // Read-around off first, so nothing faulted between the two calls reads ahead.
        advise(c, Advice::Random)?;
        advise(c, Advice::DontNeed)?;
        released.mappings += 1;
        released.kib += c.rss_kib;
        if c.exe {
            released.exe_kib += c.rss_kib;
        }
    }
    if found.iter().any(|c| c.exe) {
        drop_unmapped_cache()?;
    }
    Ok(released)
}

/// Takes `MADV_RANDOM` off the released mappings again (read-around on page-cache misses) and
/// starts reading them back into the page cache (`MADV_WILLNEED`, not mapping them: the resident
/// set stays small), for when work starts after [`release_executable_pages`].
pub fn restore_readahead() -> io::Result<()> {
    for c in &own_candidates()?.0 {
        advise(c, Advice::Normal)?;
        advise(c, Advice::WillNeed)?;
    }
    Ok(())
}

/// [`candidates`] of this process, from `/proc/self`.
fn own_candidates() -> io::Result<(Vec<Candidate>, usize)> {
    let exe = FileId::of_self()
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/exe: {e}")))?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/smaps: {e}")))?;
    Ok(candidates(&smaps, exe))
}

#[derive(Debug, Clone, Copy)]
enum Advice {
    DontNeed,
    Random,
    Normal,
    WillNeed,
}

#[cfg(target_os = "linux")]
fn advise(c: &Candidate, advice: Advice) -> io::Result<()> {
    let (flag, name) = match advice {
        Advice::DontNeed => (libc::MADV_DONTNEED, "MADV_DONTNEED"),
        Advice::Random => (libc::MADV_RANDOM, "MADV_RANDOM"),
        Advice::Normal => (libc::MADV_NORMAL, "MADV_NORMAL"),
        Advice::WillNeed => (libc::MADV_WILLNEED, "MADV_WILLNEED"),
    };
    // SAFETY: the range is one whole mapping of this process's own executable, read from
    // /proc/self/smaps just now: private (`p`), not writable, and holding no anonymous page, i.e.
    // no page was ever copied on write (relro, .data and .bss are writable or copied, so never
    // here). MADV_RANDOM, MADV_NORMAL and MADV_WILLNEED are read-ahead hints only. MADV_DONTNEED drops the
    // range's page-table entries, which loses nothing here: the next access maps the same page of
    // the unchanged file again (a running executable cannot be written: ETXTBSY). The executable's
    // mappings live as long as the process, so the range cannot have been unmapped and reused.
    let r = unsafe { libc::madvise(c.start as *mut libc::c_void, c.end - c.start, flag) };
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!(
                "madvise({name}) on the executable's mapping {:x}-{:x}: {e}",
                c.start, c.end
            ),
        ))
    }
}

/// Drops the executable's clean page-cache pages that no process maps (the kernel keeps mapped
/// ones), so fault-around has only the pages in use to map.
#[cfg(target_os = "linux")]
fn drop_unmapped_cache() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open("/proc/self/exe")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /proc/self/exe: {e}")))?;
    // SAFETY: posix_fadvise only reads the open descriptor it is given and advises the kernel;
    // `file` outlives the call.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::from_raw_os_error(r);
        Err(io::Error::new(
            e.kind(),
            format!("posix_fadvise(POSIX_FADV_DONTNEED) on /proc/self/exe: {e}"),
        ))
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_c: &Candidate, _advice: Advice) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(not(target_os = "linux"))]
fn drop_unmapped_cache() -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXE: FileId = FileId {
        major: 0xfd,
        minor: 1,
        inode: 4242,
    };

    fn mapping(range: &str, perms: &str, inode: u64, path: &str, rss: u64, anon: u64) -> String {
        format!(
            "{range} {perms} 00000000 fd:01 {inode}   {path}\nSize: 100 kB\nRss: {rss} kB\n\
             Pss: {rss} kB\nAnonymous: {anon} kB\nVmFlags: rd mr mw me\n"
        )
    }

    #[test]
    fn only_read_only_never_copied_private_file_mappings_are_candidates() {
        let smaps = [
            mapping("1000-2000", "r--p", 4242, "/usr/bin/gleaner", 8, 0),
            mapping("2000-5000", "r-xp", 4242, "/usr/bin/gleaner", 12, 0),
            // relro: read-only now, but relocated (copied on write): kept.
            mapping("5000-6000", "r--p", 4242, "/usr/bin/gleaner", 4, 4),
            // .data: writable: kept.
            mapping("6000-7000", "rw-p", 4242, "/usr/bin/gleaner", 4, 0),
            // a library's text: a candidate, not the executable.
            mapping("7000-8000", "r-xp", 77, "/usr/lib/libc.so.6", 4, 0),
            // the heap, a shared mapping, anonymous memory that is read-only now.
            mapping("8000-9000", "rw-p", 0, "[heap]", 4, 4),
            mapping("9000-a000", "r--s", 4242, "/usr/bin/gleaner", 4, 0),
            mapping("a000-b000", "r--p", 0, "", 4, 0),
            // a library's relro.
            mapping("b000-c000", "r--p", 77, "/usr/lib/libc.so.6", 4, 4),
        ]
        .concat();
        let (found, kept) = candidates(&smaps, EXE);
        assert_eq!(
            found,
            vec![
                Candidate {
                    start: 0x1000,
                    end: 0x2000,
                    rss_kib: 8,
                    exe: true,
                },
                Candidate {
                    start: 0x2000,
                    end: 0x5000,
                    rss_kib: 12,
                    exe: true,
                },
                Candidate {
                    start: 0x7000,
                    end: 0x8000,
                    rss_kib: 4,
                    exe: false,
                },
            ]
        );
        assert_eq!(
            kept, 4,
            "the relros, .data and the shared mapping are kept; the heap and anonymous memory are not file mappings"
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_never_a_candidate() {
        let smaps = "1000-2000 r-xp 00000000 fd:01 4242 /usr/bin/gleaner\nRss: 8 kB\n\
                     2000-3000 r-xp 00000000 fd:01 4242 /usr/bin/gleaner\nRss: 8 kB\nAnonymous: x kB\n";
        let (found, kept) = candidates(smaps, EXE);
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(kept, 2);
    }

    /// The real thing on this test process's own executable: its text is let go, the process
    /// keeps running (this very code faults back in), and the pages left resident are fewer.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_running_executables_pages_are_let_go_and_fault_back() {
        let exe = FileId::of_self().unwrap();
        let resident = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            candidates(&smaps, exe)
                .0
                .iter()
                .map(|c| c.rss_kib)
                .sum::<u64>()
        };
        let before = resident();
        let released = release_executable_pages().unwrap();
        assert!(released.mappings >= 2, "{released:?}");
        assert!(released.kib > 0, "{released:?}");
        let after = resident();
        assert!(
            after < before,
            "the executable's resident KiB did not drop: {before} → {after}"
        );
        // Still working code: formatting and hashing touch pages let go just now.
        let s = format!("{:?}", std::collections::BTreeMap::from([(1, "a")]));
        assert_eq!(s, r#"{1: "a"}"#);
        restore_readahead().unwrap();
    }
}
