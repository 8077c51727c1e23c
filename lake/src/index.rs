//! A segment's Parquet index: one row per packet, sorted by time (the merge writes packets
//! in time order), row groups of [`ROW_GROUP_ROWS`] with statistics, Snappy pages. Any
//! Parquet reader takes it (DuckDB, Athena, Trino, Spark); the query reads only the
//! columns that locate packets, of the row groups whose time range it wants.
//!
//! A row per packet rather than per flow: on the corpus the index is a few percent of the
//! segment's bytes (dictionary and delta encodings shrink the repeated columns), and a row
//! gives the exact byte range of its packet, where a flow row would make the query fetch and
//! filter every packet of the flow.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{Compression, Encoding};
use parquet::column::reader::{get_typed_column_reader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int32Type, Int64Type};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{ChunkReader, FileReader, Length, RowGroupReader};
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::statistics::Statistics;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

use crate::dissect::Headers as PacketHeaders;
use crate::manifest::Interface;
use crate::prune::{Constraints, End};

/// Rows per row group: the unit the query skips by time (about 8 MB of a segment of
/// 128-byte packets).
pub const ROW_GROUP_ROWS: usize = 65_536;

const SCHEMA: &str = "message packet_index {
    REQUIRED INT64 timestamp_ns;
    REQUIRED BYTE_ARRAY sensor (UTF8);
    REQUIRED BYTE_ARRAY interface (UTF8);
    REQUIRED INT32 interface_id;
    REQUIRED INT64 session_id;
    REQUIRED INT64 batch_sequence;
    REQUIRED INT32 record_index;
    REQUIRED INT32 link_type;
    OPTIONAL INT32 ethertype;
    OPTIONAL INT32 ip_version;
    OPTIONAL BYTE_ARRAY src_addr (UTF8);
    OPTIONAL BYTE_ARRAY dst_addr (UTF8);
    OPTIONAL INT32 src_port;
    OPTIONAL INT32 dst_port;
    OPTIONAL INT32 ip_protocol;
    OPTIONAL INT32 vlan_id;
    REQUIRED INT32 original_len;
    REQUIRED INT64 offset;
    REQUIRED INT32 length;
    OPTIONAL INT32 pid;
    OPTIONAL BYTE_ARRAY comm (UTF8);
    OPTIONAL BYTE_ARRAY container_id (UTF8);
}";

/// The process a packet belongs to (`sensor --attribute`), as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Process {
    pub pid: u32,
    /// The executable (its path, else its name).
    pub comm: String,
    /// Empty when not in a container.
    pub container_id: String,
}

/// One packet of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub timestamp_ns: u64,
    /// The segment's interface (its Interface Description Block's index).
    pub interface: u32,
    pub session: u64,
    pub sequence: u64,
    /// The packet's place in its batch.
    pub record: u32,
    pub original_len: u32,
    /// Its Enhanced Packet Block's place in the segment.
    pub offset: u64,
    pub length: u32,
    pub headers: PacketHeaders,
    /// Index into the segment's process table.
    pub process: Option<u32>,
}

/// Where a packet the query wants is: what [`read`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub timestamp_ns: u64,
    pub interface: u32,
    /// Its batch's key, which only the index holds (not a segment scanned without it).
    pub key: Option<BatchKey>,
    pub offset: u64,
    pub length: u32,
}

/// What names a packet across receivers: a batch sent twice has the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub session: u64,
    pub sequence: u64,
    pub record: u32,
}

/// Why an index cannot be read: the query scans the segment instead.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("it lacks column {0}")]
    MissingColumn(&'static str),
    #[error("column {0} ends early")]
    ShortColumn(&'static str),
    #[error("a row points past the segment's end")]
    OutOfRange,
    #[error("column {0} has another type than the index's")]
    WrongType(&'static str),
}

/// The index of `rows` (in time order), whose interfaces and processes are `interfaces`
/// and `processes`, as Parquet bytes.
pub fn write(
    rows: &[Row],
    interfaces: &[Interface],
    processes: &[Process],
) -> Result<Vec<u8>, IndexError> {
    let schema = Arc::new(parse_message_type(SCHEMA)?);
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_size(ROW_GROUP_ROWS)
        .set_created_by(concat!("capstream ", env!("CARGO_PKG_VERSION")).into());
    // Rising, all but unique values: deltas take a byte or two where a dictionary (the
    // default) falls back to 8 bytes a value.
    for column in ["timestamp_ns", "offset", "record_index"] {
        let path = ColumnPath::from(column);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
    }
    let props = Arc::new(props.build());
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, props)?;
    let names: Vec<(ByteArray, ByteArray)> = interfaces
        .iter()
        .map(|i| (i.sensor.as_str().into(), i.name.as_str().into()))
        .collect();
    let interface_of = |r: &Row| names.get(r.interface as usize);
    let link_type_of = |r: &Row| {
        interfaces
            .get(r.interface as usize)
            .map_or(0, |i| i32::from(i.link_type))
    };
    let process_of = |r: &Row| r.process.and_then(|p| processes.get(p as usize));
    let addresses = Addresses::default();
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut c) = group.next_column()? {
            let w = &mut c;
            match index {
                0 => write_column::<Int64Type>(w, chunk, |r| Some(r.timestamp_ns as i64), false)?,
                1 => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| interface_of(r).map(|n| n.0.clone()),
                    false,
                )?,
                2 => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| interface_of(r).map(|n| n.1.clone()),
                    false,
                )?,
                3 => write_column::<Int32Type>(w, chunk, |r| Some(r.interface as i32), false)?,
                4 => write_column::<Int64Type>(w, chunk, |r| Some(r.session as i64), false)?,
                5 => write_column::<Int64Type>(w, chunk, |r| Some(r.sequence as i64), false)?,
                6 => write_column::<Int32Type>(w, chunk, |r| Some(r.record as i32), false)?,
                7 => write_column::<Int32Type>(w, chunk, |r| Some(link_type_of(r)), false)?,
                8 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| r.headers.ethertype.map(i32::from),
                    true,
                )?,
                9 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| r.headers.ip_version.map(i32::from),
                    true,
                )?,
                10 => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| addresses.text(&r.headers, true),
                    true,
                )?,
                11 => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| addresses.text(&r.headers, false),
                    true,
                )?,
                12 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| r.headers.ports.map(|p| i32::from(p.0)),
                    true,
                )?,
                13 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| r.headers.ports.map(|p| i32::from(p.1)),
                    true,
                )?,
                14 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| r.headers.protocol.map(i32::from),
                    true,
                )?,
                15 => write_column::<Int32Type>(w, chunk, |r| r.headers.vlan.map(i32::from), true)?,
                16 => write_column::<Int32Type>(w, chunk, |r| Some(r.original_len as i32), false)?,
                17 => write_column::<Int64Type>(w, chunk, |r| Some(r.offset as i64), false)?,
                18 => write_column::<Int32Type>(w, chunk, |r| Some(r.length as i32), false)?,
                19 => write_column::<Int32Type>(
                    w,
                    chunk,
                    |r| process_of(r).map(|p| p.pid as i32),
                    true,
                )?,
                20 => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| process_of(r).map(|p| p.comm.as_str().into()),
                    true,
                )?,
                _ => write_column::<ByteArrayType>(
                    w,
                    chunk,
                    |r| {
                        process_of(r)
                            .filter(|p| !p.container_id.is_empty())
                            .map(|p| p.container_id.as_str().into())
                    },
                    true,
                )?,
            }
            c.close()?;
            index += 1;
        }
        group.close()?;
    }
    writer.close()?;
    Ok(out)
}

/// The addresses of a segment's rows as text, each made once: a segment holds few
/// addresses and many packets.
#[derive(Default)]
struct Addresses(RefCell<HashMap<(u8, [u8; 16]), ByteArray>>);

impl Addresses {
    fn text(&self, h: &PacketHeaders, source: bool) -> Option<ByteArray> {
        let bytes = if source { &h.src } else { &h.dst };
        let version = match h.arp {
            true => 4,
            false => h.ip_version?,
        };
        let mut cache = self.0.borrow_mut();
        let text = cache.entry((version, *bytes)).or_insert_with(|| {
            let text = match version {
                4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
                _ => std::net::Ipv6Addr::from(*bytes).to_string(),
            };
            text.into_bytes().into()
        });
        Some(text.clone())
    }
}

type ColumnWriter<'a> = parquet::file::writer::SerializedColumnWriter<'a>;

/// Writes a column of `T` from `value` of each row (`None`: null, in an optional column).
fn write_column<T: DataType>(
    w: &mut ColumnWriter<'_>,
    rows: &[Row],
    value: impl Fn(&Row) -> Option<T::T>,
    optional: bool,
) -> parquet::errors::Result<()>
where
    T::T: Default,
{
    let (values, levels) = collect(rows, value, optional);
    w.typed::<T>()
        .write_batch(&values, levels.as_deref(), None)?;
    Ok(())
}

/// The values present, and for an optional column the definition level of each row.
fn collect<T: Default>(
    rows: &[Row],
    value: impl Fn(&Row) -> Option<T>,
    optional: bool,
) -> (Vec<T>, Option<Vec<i16>>) {
    let mut values = Vec::with_capacity(rows.len());
    let mut levels = optional.then(|| Vec::with_capacity(rows.len()));
    for r in rows {
        let v = value(r);
        match &mut levels {
            Some(levels) => {
                levels.push(i16::from(v.is_some()));
                values.extend(v);
            }
            // A required column always has its value.
            None => values.push(v.unwrap_or_default()),
        }
    }
    (values, levels)
}

/// What a query reads of an index: the row groups whose statistics allow rows it wants,
/// and the columns it needs of them (those that locate packets, and the header columns
/// when the filter constrains them).
pub struct Plan {
    pub groups: Vec<usize>,
    /// Row groups skipped by their statistics.
    pub skipped: usize,
    /// timestamp_ns, interface_id, session_id, batch_sequence, record_index, offset, length.
    columns: [usize; 7],
    /// ethertype, ip_version, src_addr, dst_addr, src_port, dst_port.
    header_columns: [usize; 6],
    constrained: bool,
}

impl Plan {
    /// The plan for packets from `from` up to `to` (ns, inclusive) that `constraints` allow.
    pub fn new(
        metadata: &ParquetMetaData,
        from: u64,
        to: u64,
        constraints: &Constraints,
    ) -> Result<Self, IndexError> {
        let schema = metadata.file_metadata().schema_descr_ptr();
        let column = |name: &'static str| {
            (0..schema.num_columns())
                .find(|&i| schema.column(i).name() == name)
                .ok_or(IndexError::MissingColumn(name))
        };
        let columns = [
            column("timestamp_ns")?,
            column("interface_id")?,
            column("session_id")?,
            column("batch_sequence")?,
            column("record_index")?,
            column("offset")?,
            column("length")?,
        ];
        let header_columns = [
            column("ethertype")?,
            column("ip_version")?,
            column("src_addr")?,
            column("dst_addr")?,
            column("src_port")?,
            column("dst_port")?,
        ];
        let mut groups = Vec::new();
        let mut skipped = 0;
        for (g, meta) in metadata.row_groups().iter().enumerate() {
            let in_time = match meta.column(columns[0]).statistics() {
                Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(&min), Some(&max)) => (max as u64) >= from && (min as u64) <= to,
                    _ => true,
                },
                _ => true,
            };
            if in_time
                && (constraints.is_empty() || group_may_match(meta, &header_columns, constraints))
            {
                groups.push(g);
            } else {
                skipped += 1;
            }
        }
        Ok(Self {
            groups,
            skipped,
            columns,
            header_columns,
            constrained: !constraints.is_empty(),
        })
    }

    /// The byte ranges of the index the plan reads (its column chunks).
    pub fn ranges(&self, metadata: &ParquetMetaData) -> Vec<Range<u64>> {
        let mut ranges = Vec::new();
        for &g in &self.groups {
            let group = metadata.row_group(g);
            let headers = self.header_columns.iter().filter(|_| self.constrained);
            for &c in self.columns.iter().chain(headers) {
                let (start, len) = group.column(c).byte_range();
                ranges.push(start..start + len);
            }
        }
        ranges
    }
}

/// The parts of an index file a query fetched (its footer, the column chunks of its plan),
/// read as the whole file: a read of any other part is an error.
pub struct Sparse {
    pub len: u64,
    pub parts: Vec<(u64, Bytes)>,
}

impl Sparse {
    fn part(&self, start: u64, len: u64) -> parquet::errors::Result<Bytes> {
        self.parts
            .iter()
            .find(|(at, b)| *at <= start && start + len <= at + b.len() as u64)
            .map(|(at, b)| b.slice((start - at) as usize..(start - at + len) as usize))
            .ok_or_else(|| {
                parquet::errors::ParquetError::General(format!(
                    "bytes {start}..{} of the index were not fetched",
                    start + len
                ))
            })
    }
}

impl Length for Sparse {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Sparse {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let (at, b) = self
            .parts
            .iter()
            .find(|(at, b)| *at <= start && start < at + b.len() as u64)
            .ok_or_else(|| {
                parquet::errors::ParquetError::General(format!(
                    "byte {start} of the index was not fetched"
                ))
            })?;
        Ok(bytes::Buf::reader(b.slice((start - at) as usize..)))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.part(start, length as u64)
    }
}

/// The packets of an index (`chunk`: the whole file or what [`Plan::ranges`] names of it)
/// from `from` up to `to` (ns, inclusive) that `constraints` allow, of a segment of
/// `segment_len` bytes; also the number of row groups skipped by their statistics.
pub fn read<R: ChunkReader + 'static>(
    chunk: R,
    from: u64,
    to: u64,
    segment_len: u64,
    constraints: &Constraints,
) -> Result<(Vec<Candidate>, usize), IndexError> {
    let reader = SerializedFileReader::new(chunk)?;
    let plan = Plan::new(reader.metadata(), from, to, constraints)?;
    let (columns, header_columns) = (plan.columns, plan.header_columns);
    let mut out = Vec::new();
    for &g in &plan.groups {
        let meta = reader.metadata().row_group(g);
        let rows = usize::try_from(meta.num_rows()).unwrap_or(0);
        let group = reader.get_row_group(g)?;
        let headers = match plan.constrained {
            false => None,
            true => Some(Headers::read(&*group, &header_columns, rows)?),
        };
        let ts = values::<Int64Type>(&*group, columns[0], rows, "timestamp_ns")?;
        let interface = values::<Int32Type>(&*group, columns[1], rows, "interface_id")?;
        let session = values::<Int64Type>(&*group, columns[2], rows, "session_id")?;
        let sequence = values::<Int64Type>(&*group, columns[3], rows, "batch_sequence")?;
        let record = values::<Int32Type>(&*group, columns[4], rows, "record_index")?;
        let offset = values::<Int64Type>(&*group, columns[5], rows, "offset")?;
        let length = values::<Int32Type>(&*group, columns[6], rows, "length")?;
        for i in 0..rows {
            let t = ts[i] as u64;
            if t < from || t > to {
                continue;
            }
            if headers
                .as_ref()
                .is_some_and(|h| !h.may_match(i, constraints))
            {
                continue;
            }
            let (offset, length) = (offset[i] as u64, length[i] as u32);
            if offset.saturating_add(u64::from(length)) > segment_len || length < 32 {
                return Err(IndexError::OutOfRange);
            }
            out.push(Candidate {
                timestamp_ns: t,
                interface: interface[i] as u32,
                key: Some(BatchKey {
                    session: session[i] as u64,
                    sequence: sequence[i] as u64,
                    record: record[i] as u32,
                }),
                offset,
                length,
            });
        }
    }
    Ok((out, plan.skipped))
}

/// Whether a row group's statistics allow a row `constraints` may match: one that is not
/// IP as the index reads it (a null `ip_version`), or has the addresses and ports in range.
fn group_may_match(
    meta: &parquet::file::metadata::RowGroupMetaData,
    columns: &[usize; 6],
    constraints: &Constraints,
) -> bool {
    let stats = |i: usize| meta.column(columns[i + 1]).statistics();
    let all_ip = stats(0)
        .and_then(Statistics::null_count_opt)
        .is_some_and(|nulls| nulls == 0);
    if !all_ip {
        return true;
    }
    // Within [min, max] of the column, or no statistics to say otherwise.
    let text_in = |i: usize, value: &str| match stats(i) {
        Some(Statistics::ByteArray(s)) => match (s.min_opt(), s.max_opt()) {
            (Some(min), Some(max)) => {
                min.data() <= value.as_bytes() && value.as_bytes() <= max.data()
            }
            _ => false,
        },
        _ => true,
    };
    let port_in = |i: usize, port: u16| match stats(i) {
        Some(Statistics::Int32(s)) => match (s.min_opt(), s.max_opt()) {
            (Some(&min), Some(&max)) => min <= i32::from(port) && i32::from(port) <= max,
            _ => false,
        },
        _ => true,
    };
    let hosts = constraints.hosts.iter().all(|(end, host)| match end {
        End::Src => text_in(1, host),
        End::Dst => text_in(2, host),
        End::Either => text_in(1, host) || text_in(2, host),
    });
    hosts
        && constraints.ports.iter().all(|&(end, port)| match end {
            End::Src => port_in(3, port),
            End::Dst => port_in(4, port),
            End::Either => port_in(3, port) || port_in(4, port),
        })
}

/// The header columns of a row group that constraints check.
struct Headers {
    ethertype: Vec<Option<i32>>,
    ip_version: Vec<Option<i32>>,
    src: Vec<Option<ByteArray>>,
    dst: Vec<Option<ByteArray>>,
    src_port: Vec<Option<i32>>,
    dst_port: Vec<Option<i32>>,
}

impl Headers {
    fn read(group: &dyn RowGroupReader, c: &[usize; 6], rows: usize) -> Result<Self, IndexError> {
        Ok(Self {
            ethertype: optional::<Int32Type>(group, c[0], rows, "ethertype")?,
            ip_version: optional::<Int32Type>(group, c[1], rows, "ip_version")?,
            src: optional::<ByteArrayType>(group, c[2], rows, "src_addr")?,
            dst: optional::<ByteArrayType>(group, c[3], rows, "dst_addr")?,
            src_port: optional::<Int32Type>(group, c[4], rows, "src_port")?,
            dst_port: optional::<Int32Type>(group, c[5], rows, "dst_port")?,
        })
    }

    /// `constraints` may match row `i`: by its addresses and ports if the index read it as
    /// IP, or ARP (no ports); else unless its EtherType is one libpcap's `host` and `port`
    /// never match.
    fn may_match(&self, i: usize, constraints: &Constraints) -> bool {
        if self.ip_version[i].is_none() {
            let arp = self.src[i].is_some();
            return match self.ethertype[i] {
                Some(_) if arp => {
                    constraints.may_match(text(&self.src[i]), text(&self.dst[i]), None)
                }
                Some(e) => constraints.may_match_ethertype(e as u16),
                None => true,
            };
        }
        let ports = self.src_port[i]
            .zip(self.dst_port[i])
            .map(|(s, d)| (s as u16, d as u16));
        constraints.may_match(text(&self.src[i]), text(&self.dst[i]), ports)
    }
}

fn text(value: &Option<ByteArray>) -> &[u8] {
    match value {
        Some(v) => v.data(),
        None => &[],
    }
}

/// A reader of `column` as `T`, if that is its type (the typed reader panics otherwise: a
/// damaged or foreign index is an error, never a crash).
fn typed_reader<T: DataType>(
    group: &dyn RowGroupReader,
    column: usize,
    name: &'static str,
) -> Result<ColumnReaderImpl<T>, IndexError> {
    if group.metadata().column(column).column_type() != T::get_physical_type() {
        return Err(IndexError::WrongType(name));
    }
    Ok(get_typed_column_reader(group.get_column_reader(column)?))
}

/// Room reserved ahead for a column's values: the footer's row count is not trusted further
/// than a row group of the index's own size.
fn reserve(rows: usize) -> usize {
    rows.min(ROW_GROUP_ROWS)
}

/// An optional column's `rows` values.
fn optional<T: DataType>(
    group: &dyn RowGroupReader,
    column: usize,
    rows: usize,
    name: &'static str,
) -> Result<Vec<Option<T::T>>, IndexError> {
    let mut reader = typed_reader::<T>(group, column, name)?;
    let mut values = Vec::with_capacity(reserve(rows));
    let mut levels = Vec::with_capacity(reserve(rows));
    while levels.len() < rows {
        let before = levels.len();
        reader.read_records(rows - levels.len(), Some(&mut levels), None, &mut values)?;
        if levels.len() == before {
            return Err(IndexError::ShortColumn(name));
        }
    }
    let mut present = values.into_iter();
    levels
        .iter()
        .map(|&level| match level {
            0 => Ok(None),
            _ => present
                .next()
                .map(Some)
                .ok_or(IndexError::ShortColumn(name)),
        })
        .collect()
}

/// A required column's `rows` values.
fn values<T: DataType>(
    group: &dyn RowGroupReader,
    column: usize,
    rows: usize,
    name: &'static str,
) -> Result<Vec<T::T>, IndexError> {
    let mut reader = typed_reader::<T>(group, column, name)?;
    let mut values = Vec::with_capacity(reserve(rows));
    while values.len() < rows {
        let before = values.len();
        reader.read_records(rows - values.len(), None, None, &mut values)?;
        if values.len() == before {
            return Err(IndexError::ShortColumn(name));
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u64) -> Row {
        let mut headers = PacketHeaders {
            ethertype: Some(0x0800),
            ip_version: Some(4),
            protocol: Some(17),
            ports: Some((1000, if i.is_multiple_of(100) { 53 } else { 80 })),
            ..PacketHeaders::default()
        };
        headers.src[..4].copy_from_slice(&[198, 18, 0, 1]);
        headers.dst[..4].copy_from_slice(&[198, 18, 0, (i % 7) as u8 + 2]);
        Row {
            timestamp_ns: 1_000 + i,
            interface: 0,
            session: 7,
            sequence: i / 10,
            record: (i % 10) as u32,
            original_len: 60,
            offset: i * 100,
            length: 100,
            headers,
            process: None,
        }
    }

    #[test]
    fn rows_read_back_by_time_and_by_host_and_port() {
        let rows: Vec<Row> = (0..100_000).map(row).collect();
        let interfaces = [Interface {
            name: "h/eth0".into(),
            sensor: "s".into(),
            link_type: 1,
            snaplen: 65535,
            session: 7,
        }];
        let bytes = Bytes::from(write(&rows, &interfaces, &[]).unwrap());
        let all = Constraints::default();
        let (found, skipped) = read(bytes.clone(), 0, u64::MAX, 10_000_000, &all).unwrap();
        assert_eq!((found.len(), skipped), (100_000, 0));
        assert_eq!(found[12].key.unwrap().sequence, 1);
        assert_eq!(found[12].offset, 1200);
        // The second row group only, by its time statistics.
        let (found, skipped) = read(bytes.clone(), 70_000, u64::MAX, 10_000_000, &all).unwrap();
        assert_eq!((found.len(), skipped), (100_000 - 70_000 + 1_000, 1));
        let dns = Constraints::of("host 198.18.0.2 and udp port 53");
        let (found, _) = read(bytes.clone(), 0, u64::MAX, 10_000_000, &dns).unwrap();
        let expected = (0..100_000u64)
            .filter(|i| i.is_multiple_of(100) && i.is_multiple_of(7))
            .count();
        assert_eq!(found.len(), expected);
        // A row past the segment's end: the index is not used.
        assert!(matches!(
            read(bytes, 0, u64::MAX, 1_000, &all),
            Err(IndexError::OutOfRange)
        ));
    }
}
