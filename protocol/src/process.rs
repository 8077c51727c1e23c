//! The processes a batch's packets belong to (`--attribute`).
//!
//! A batch carries each process it mentions once, as a record of its own ahead of the first
//! packet that refers to it; an attributed packet's record holds a two-byte index into that
//! table and nothing else. A process record is `kind` 4 with `timestamp_ns` 0 and equal
//! lengths; its bytes are `pid: u32`, `tid: u32`, `uid: u32`, then six strings (`u16`
//! length, UTF-8): the executable, the command line, the thread's name, the cgroup path,
//! the container id and the pod UID (empty when unknown).

use bytes::{Buf, BufMut};

use crate::codec::DecodeError;

/// Longest string a process record keeps (a command line is cut there).
pub const MAX_PROCESS_FIELD: usize = 4096;

/// A process of a received batch's table, with its pcapng comment and fields made once for
/// all the packets that refer to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// The process.
    pub process: Process,
    /// [`Process::comment`].
    pub comment: String,
    /// [`Process::fields_json`].
    pub fields: String,
}

impl Attribution {
    /// The process with its comment and fields.
    pub fn new(process: Process) -> Self {
        Self {
            comment: process.comment(),
            fields: process.fields_json(),
            process,
        }
    }
}

/// Who owned the socket of a packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// The process id (thread group id).
    pub pid: u32,
    /// The id of the thread that created, bound, connected or sent on the socket last.
    pub tid: u32,
    /// Its user id.
    pub uid: u32,
    /// The executable's path (`/proc/PID/exe`), or the process's name when unreadable.
    pub cmd: String,
    /// The command line, arguments separated by spaces.
    pub args: String,
    /// The thread's name (`comm`, at most 15 bytes).
    pub thread_name: String,
    /// The cgroup (v2) path, as in `/proc/PID/cgroup`.
    pub cgroup: String,
    /// The container's id, from the cgroup path ([`crate::cgroup`]).
    pub container_id: String,
    /// The Kubernetes pod's UID, from the cgroup path.
    pub pod_uid: String,
}

impl Process {
    /// Appends the record bytes (fields cut at [`MAX_PROCESS_FIELD`] bytes).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.pid);
        out.put_u32(self.tid);
        out.put_u32(self.uid);
        for field in self.strings() {
            let mut len = field.len().min(MAX_PROCESS_FIELD);
            while !field.is_char_boundary(len) {
                len -= 1;
            }
            out.put_u16(len as u16);
            out.put_slice(&field.as_bytes()[..len]);
        }
    }

    fn strings(&self) -> [&str; 6] {
        [
            &self.cmd,
            &self.args,
            &self.thread_name,
            &self.cgroup,
            &self.container_id,
            &self.pod_uid,
        ]
    }

    pub(crate) fn decode(mut b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 12 {
            return Err(DecodeError::Truncated {
                field: "process record",
                needed: 12 - b.len(),
            });
        }
        let (pid, tid, uid) = (b.get_u32(), b.get_u32(), b.get_u32());
        let mut strings: [String; 6] = Default::default();
        for s in &mut strings {
            if b.len() < 2 {
                return Err(DecodeError::Truncated {
                    field: "process field length",
                    needed: 2 - b.len(),
                });
            }
            let len = usize::from(b.get_u16());
            if b.len() < len {
                return Err(DecodeError::Truncated {
                    field: "process field",
                    needed: len - b.len(),
                });
            }
            *s = String::from_utf8_lossy(&b[..len]).into_owned();
            b.advance(len);
        }
        let [cmd, args, thread_name, cgroup, container_id, pod_uid] = strings;
        Ok(Self {
            pid,
            tid,
            uid,
            cmd,
            args,
            thread_name,
            cgroup,
            container_id,
            pod_uid,
        })
    }

    /// The pcapng packet comment ptcpdump writes (`PID: …` lines; Wireshark shows it as
    /// `frame.comment`), with the cgroup path added; unknown fields are left out.
    pub fn comment(&self) -> String {
        let mut lines = vec![
            format!("PID: {}", self.pid),
            format!("Cmd: {}", self.cmd),
            format!("Args: {}", self.args),
            format!("ThreadId: {}", self.tid),
            format!("ThreadName: {}", self.thread_name),
            format!("UserId: {}", self.uid),
        ];
        for (key, value) in [
            ("Cgroup", &self.cgroup),
            ("ContainerId", &self.container_id),
            ("PodUID", &self.pod_uid),
        ] {
            if !value.is_empty() {
                lines.push(format!("{key}: {value}"));
            }
        }
        lines.join("\n")
    }

    /// The same fields for tools: one JSON object with every key (`pid`, `tid`, `uid`
    /// numbers; `cmd`, `args`, `thread_name`, `cgroup`, `container_id`, `pod_uid` strings,
    /// empty when unknown).
    pub fn fields_json(&self) -> String {
        let mut fields = serde_json::Map::new();
        for (key, value) in [("pid", self.pid), ("tid", self.tid), ("uid", self.uid)] {
            fields.insert(key.into(), value.into());
        }
        let keys = [
            "cmd",
            "args",
            "thread_name",
            "cgroup",
            "container_id",
            "pod_uid",
        ];
        for (key, value) in keys.into_iter().zip(self.strings()) {
            fields.insert(key.into(), value.into());
        }
        serde_json::Value::Object(fields).to_string()
    }
}
