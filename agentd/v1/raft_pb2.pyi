from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RaftEntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAFT_ENTRY_NORMAL: _ClassVar[RaftEntryKind]
    RAFT_ENTRY_CONFIG: _ClassVar[RaftEntryKind]
    RAFT_ENTRY_NOOP: _ClassVar[RaftEntryKind]
RAFT_ENTRY_NORMAL: RaftEntryKind
RAFT_ENTRY_CONFIG: RaftEntryKind
RAFT_ENTRY_NOOP: RaftEntryKind

class RaftEntry(_message.Message):
    __slots__ = ("index", "term", "kind", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    kind: RaftEntryKind
    data: bytes
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., kind: _Optional[_Union[RaftEntryKind, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RaftMember(_message.Message):
    __slots__ = ("id", "address", "voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    voter: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., voter: _Optional[bool] = ...) -> None: ...

class RequestVote(_message.Message):
    __slots__ = ("last_log_index", "last_log_term", "pre_vote", "transfer")
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    last_log_index: int
    last_log_term: int
    pre_vote: bool
    transfer: bool
    def __init__(self, last_log_index: _Optional[int] = ..., last_log_term: _Optional[int] = ..., pre_vote: _Optional[bool] = ..., transfer: _Optional[bool] = ...) -> None: ...

class RequestVoteResponse(_message.Message):
    __slots__ = ("granted", "pre_vote")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    pre_vote: bool
    def __init__(self, granted: _Optional[bool] = ..., pre_vote: _Optional[bool] = ...) -> None: ...

class AppendEntries(_message.Message):
    __slots__ = ("prev_log_index", "prev_log_term", "entries", "leader_commit")
    PREV_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LEADER_COMMIT_FIELD_NUMBER: _ClassVar[int]
    prev_log_index: int
    prev_log_term: int
    entries: _containers.RepeatedCompositeFieldContainer[RaftEntry]
    leader_commit: int
    def __init__(self, prev_log_index: _Optional[int] = ..., prev_log_term: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[RaftEntry, _Mapping]]] = ..., leader_commit: _Optional[int] = ...) -> None: ...

class AppendEntriesResponse(_message.Message):
    __slots__ = ("success", "index", "hint_index", "hint_term", "last_log_index")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HINT_INDEX_FIELD_NUMBER: _ClassVar[int]
    HINT_TERM_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    success: bool
    index: int
    hint_index: int
    hint_term: int
    last_log_index: int
    def __init__(self, success: _Optional[bool] = ..., index: _Optional[int] = ..., hint_index: _Optional[int] = ..., hint_term: _Optional[int] = ..., last_log_index: _Optional[int] = ...) -> None: ...

class RaftHeartbeat(_message.Message):
    __slots__ = ("leader_commit", "read_seq")
    LEADER_COMMIT_FIELD_NUMBER: _ClassVar[int]
    READ_SEQ_FIELD_NUMBER: _ClassVar[int]
    leader_commit: int
    read_seq: int
    def __init__(self, leader_commit: _Optional[int] = ..., read_seq: _Optional[int] = ...) -> None: ...

class RaftHeartbeatResponse(_message.Message):
    __slots__ = ("read_seq",)
    READ_SEQ_FIELD_NUMBER: _ClassVar[int]
    read_seq: int
    def __init__(self, read_seq: _Optional[int] = ...) -> None: ...

class InstallSnapshot(_message.Message):
    __slots__ = ("last_included_index", "last_included_term", "members", "offset", "data", "done", "total_size")
    LAST_INCLUDED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_INCLUDED_TERM_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    last_included_index: int
    last_included_term: int
    members: _containers.RepeatedCompositeFieldContainer[RaftMember]
    offset: int
    data: bytes
    done: bool
    total_size: int
    def __init__(self, last_included_index: _Optional[int] = ..., last_included_term: _Optional[int] = ..., members: _Optional[_Iterable[_Union[RaftMember, _Mapping]]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., total_size: _Optional[int] = ...) -> None: ...

class TimeoutNow(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaftMessage(_message.Message):
    __slots__ = ("cluster_id", "sender", "to", "term", "sender_address", "request_vote", "request_vote_response", "append_entries", "append_entries_response", "heartbeat", "heartbeat_response", "install_snapshot", "timeout_now")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    SENDER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_VOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_VOTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    APPEND_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    APPEND_ENTRIES_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    INSTALL_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_NOW_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    sender: str
    to: str
    term: int
    sender_address: str
    request_vote: RequestVote
    request_vote_response: RequestVoteResponse
    append_entries: AppendEntries
    append_entries_response: AppendEntriesResponse
    heartbeat: RaftHeartbeat
    heartbeat_response: RaftHeartbeatResponse
    install_snapshot: InstallSnapshot
    timeout_now: TimeoutNow
    def __init__(self, cluster_id: _Optional[str] = ..., sender: _Optional[str] = ..., to: _Optional[str] = ..., term: _Optional[int] = ..., sender_address: _Optional[str] = ..., request_vote: _Optional[_Union[RequestVote, _Mapping]] = ..., request_vote_response: _Optional[_Union[RequestVoteResponse, _Mapping]] = ..., append_entries: _Optional[_Union[AppendEntries, _Mapping]] = ..., append_entries_response: _Optional[_Union[AppendEntriesResponse, _Mapping]] = ..., heartbeat: _Optional[_Union[RaftHeartbeat, _Mapping]] = ..., heartbeat_response: _Optional[_Union[RaftHeartbeatResponse, _Mapping]] = ..., install_snapshot: _Optional[_Union[InstallSnapshot, _Mapping]] = ..., timeout_now: _Optional[_Union[TimeoutNow, _Mapping]] = ...) -> None: ...

class RaftSendReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class RaftJoinRequest(_message.Message):
    __slots__ = ("node_id", "address", "has_log", "agent_version", "state_format", "can_watch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HAS_LOG_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CAN_WATCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    has_log: bool
    agent_version: str
    state_format: int
    can_watch: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., has_log: _Optional[bool] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., can_watch: _Optional[bool] = ...) -> None: ...

class RaftJoinReply(_message.Message):
    __slots__ = ("watcher", "cluster_id", "leader_id", "members", "voter", "admitted_index")
    WATCHER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    watcher: bool
    cluster_id: str
    leader_id: str
    members: _containers.RepeatedCompositeFieldContainer[RaftMember]
    voter: bool
    admitted_index: int
    def __init__(self, watcher: _Optional[bool] = ..., cluster_id: _Optional[str] = ..., leader_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[RaftMember, _Mapping]]] = ..., voter: _Optional[bool] = ..., admitted_index: _Optional[int] = ...) -> None: ...

class RaftLeaveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class RaftLeaveReply(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[RaftMember]
    def __init__(self, members: _Optional[_Iterable[_Union[RaftMember, _Mapping]]] = ...) -> None: ...

class RaftWatchRequest(_message.Message):
    __slots__ = ("node_id", "from_index", "cluster_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    from_index: int
    cluster_id: str
    def __init__(self, node_id: _Optional[str] = ..., from_index: _Optional[int] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class RaftWatchSnapshot(_message.Message):
    __slots__ = ("index", "term", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RaftWatchLeader(_message.Message):
    __slots__ = ("leader_id", "leader_address", "term", "commit_index", "members")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    leader_address: str
    term: int
    commit_index: int
    members: _containers.RepeatedCompositeFieldContainer[RaftMember]
    def __init__(self, leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[RaftMember, _Mapping]]] = ...) -> None: ...

class RaftWatchEvent(_message.Message):
    __slots__ = ("snapshot", "entry", "leader")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    snapshot: RaftWatchSnapshot
    entry: RaftEntry
    leader: RaftWatchLeader
    def __init__(self, snapshot: _Optional[_Union[RaftWatchSnapshot, _Mapping]] = ..., entry: _Optional[_Union[RaftEntry, _Mapping]] = ..., leader: _Optional[_Union[RaftWatchLeader, _Mapping]] = ...) -> None: ...
