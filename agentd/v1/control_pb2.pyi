from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuPin(_message.Message):
    __slots__ = ("host", "gpus")
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    host: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, host: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ...) -> None: ...

class RuntimeOptions(_message.Message):
    __slots__ = ("gpu_memory_utilization", "ctx_size", "allow_cpu_offload", "extra_args", "env")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    CTX_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CPU_OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    gpu_memory_utilization: float
    ctx_size: int
    allow_cpu_offload: bool
    extra_args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    def __init__(self, gpu_memory_utilization: _Optional[float] = ..., ctx_size: _Optional[int] = ..., allow_cpu_offload: _Optional[bool] = ..., extra_args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "model", "runtime", "replicas", "strategy", "selector", "pin", "exclude_gpus", "options", "tenant", "parallelism", "idle_unload", "min_replicas", "max_replicas", "target_queue")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_GPUS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    IDLE_UNLOAD_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_QUEUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    runtime: str
    replicas: int
    strategy: str
    selector: _containers.ScalarMap[str, str]
    pin: _containers.RepeatedCompositeFieldContainer[GpuPin]
    exclude_gpus: _containers.RepeatedScalarFieldContainer[str]
    options: RuntimeOptions
    tenant: str
    parallelism: str
    idle_unload: float
    min_replicas: int
    max_replicas: int
    target_queue: float
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., runtime: _Optional[str] = ..., replicas: _Optional[int] = ..., strategy: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., pin: _Optional[_Iterable[_Union[GpuPin, _Mapping]]] = ..., exclude_gpus: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[RuntimeOptions, _Mapping]] = ..., tenant: _Optional[str] = ..., parallelism: _Optional[str] = ..., idle_unload: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., target_queue: _Optional[float] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "deployment", "replica", "generation", "part", "host", "gpus", "role", "state", "reason", "restarts", "endpoint", "term", "pid", "port_in_use")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PORT_IN_USE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    deployment: str
    replica: int
    generation: int
    part: int
    host: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    role: str
    state: str
    reason: str
    restarts: int
    endpoint: str
    term: int
    pid: int
    port_in_use: int
    def __init__(self, instance_id: _Optional[str] = ..., deployment: _Optional[str] = ..., replica: _Optional[int] = ..., generation: _Optional[int] = ..., part: _Optional[int] = ..., host: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., restarts: _Optional[int] = ..., endpoint: _Optional[str] = ..., term: _Optional[int] = ..., pid: _Optional[int] = ..., port_in_use: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "instances", "assignments_json", "updated_index", "idle", "wake_error", "scaling")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_INDEX_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    WAKE_ERROR_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    assignments_json: str
    updated_index: int
    idle: bool
    wake_error: str
    scaling: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., assignments_json: _Optional[str] = ..., updated_index: _Optional[int] = ..., idle: _Optional[bool] = ..., wake_error: _Optional[str] = ..., scaling: _Optional[str] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("spec", "replace")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    replace: bool
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class DeployReply(_message.Message):
    __slots__ = ("deployment", "message", "index", "why")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    message: str
    index: int
    why: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., message: _Optional[str] = ..., index: _Optional[int] = ..., why: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("name", "serializable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERIALIZABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    serializable: bool
    def __init__(self, name: _Optional[str] = ..., serializable: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("serializable",)
    SERIALIZABLE_FIELD_NUMBER: _ClassVar[int]
    serializable: bool
    def __init__(self, serializable: _Optional[bool] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("message", "index")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    message: str
    index: int
    def __init__(self, message: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("name", "replicas", "min_replicas", "max_replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ...) -> None: ...

class WakeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WakeReply(_message.Message):
    __slots__ = ("message", "index", "woken")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WOKEN_FIELD_NUMBER: _ClassVar[int]
    message: str
    index: int
    woken: bool
    def __init__(self, message: _Optional[str] = ..., index: _Optional[int] = ..., woken: _Optional[bool] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("placed", "plan_json")
    PLACED_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    placed: bool
    plan_json: str
    def __init__(self, placed: _Optional[bool] = ..., plan_json: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "address", "state", "voter", "leader", "inventory_json", "last_seen_seconds", "agent_version", "state_format", "upgrade_required", "cordoned", "draining", "drain_blocked", "role", "reports_via", "watches_from")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DRAIN_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_VIA_FIELD_NUMBER: _ClassVar[int]
    WATCHES_FROM_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: str
    voter: bool
    leader: bool
    inventory_json: str
    last_seen_seconds: float
    agent_version: str
    state_format: int
    upgrade_required: str
    cordoned: _containers.RepeatedScalarFieldContainer[str]
    draining: int
    drain_blocked: str
    role: str
    reports_via: str
    watches_from: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., voter: _Optional[bool] = ..., leader: _Optional[bool] = ..., inventory_json: _Optional[str] = ..., last_seen_seconds: _Optional[float] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., upgrade_required: _Optional[str] = ..., cordoned: _Optional[_Iterable[str]] = ..., draining: _Optional[int] = ..., drain_blocked: _Optional[str] = ..., role: _Optional[str] = ..., reports_via: _Optional[str] = ..., watches_from: _Optional[str] = ...) -> None: ...

class CordonRequest(_message.Message):
    __slots__ = ("target", "reason", "drain", "force")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: str
    drain: bool
    force: bool
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[str] = ..., drain: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class CordonReply(_message.Message):
    __slots__ = ("message", "index", "host", "gpu")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    message: str
    index: int
    host: str
    gpu: int
    def __init__(self, message: _Optional[str] = ..., index: _Optional[int] = ..., host: _Optional[str] = ..., gpu: _Optional[int] = ...) -> None: ...

class UncordonRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveNodeReply(_message.Message):
    __slots__ = ("message", "index", "replicas", "left_raft")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LEFT_RAFT_FIELD_NUMBER: _ClassVar[int]
    message: str
    index: int
    replicas: int
    left_raft: bool
    def __init__(self, message: _Optional[str] = ..., index: _Optional[int] = ..., replicas: _Optional[int] = ..., left_raft: _Optional[bool] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("limit", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes", "next_page_token")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    next_page_token: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("deployment", "local", "reported_only")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REPORTED_ONLY_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    local: bool
    reported_only: bool
    def __init__(self, deployment: _Optional[str] = ..., local: _Optional[bool] = ..., reported_only: _Optional[bool] = ...) -> None: ...

class ListInstancesReply(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    def __init__(self, deployment: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "name", "index", "term", "data_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    index: int
    term: int
    data_json: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ..., term: _Optional[int] = ..., data_json: _Optional[str] = ...) -> None: ...

class LeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaderReply(_message.Message):
    __slots__ = ("leader_id", "leader_address", "term")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    leader_address: str
    term: int
    def __init__(self, leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "address", "voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    voter: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., voter: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "leader_id", "leader_address", "term", "commit_index", "last_applied", "members", "agent_version", "state_format", "cluster_format", "upgrade_required", "wire_version", "watching")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FORMAT_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WATCHING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    leader_id: str
    leader_address: str
    term: int
    commit_index: int
    last_applied: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    agent_version: str
    state_format: int
    cluster_format: int
    upgrade_required: str
    wire_version: int
    watching: str
    def __init__(self, node_id: _Optional[str] = ..., leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., last_applied: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., cluster_format: _Optional[int] = ..., upgrade_required: _Optional[str] = ..., wire_version: _Optional[int] = ..., watching: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("instance_id", "part", "follow", "previous", "tail_lines")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    part: int
    follow: bool
    previous: bool
    tail_lines: int
    def __init__(self, instance_id: _Optional[str] = ..., part: _Optional[int] = ..., follow: _Optional[bool] = ..., previous: _Optional[bool] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data", "host")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    host: str
    def __init__(self, data: _Optional[bytes] = ..., host: _Optional[str] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("read_index_only",)
    READ_INDEX_ONLY_FIELD_NUMBER: _ClassVar[int]
    read_index_only: bool
    def __init__(self, read_index_only: _Optional[bool] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("data", "index", "term", "cluster_id", "node_id", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    index: int
    term: int
    cluster_id: str
    node_id: str
    size: int
    def __init__(self, data: _Optional[bytes] = ..., index: _Optional[int] = ..., term: _Optional[int] = ..., cluster_id: _Optional[str] = ..., node_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("node", "address", "inventory_json", "instances", "agent_version", "state_format", "wire_version", "upgrade_required", "activity")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    inventory_json: str
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    agent_version: str
    state_format: int
    wire_version: int
    upgrade_required: str
    activity: _containers.RepeatedCompositeFieldContainer[ModelActivity]
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., inventory_json: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., wire_version: _Optional[int] = ..., upgrade_required: _Optional[str] = ..., activity: _Optional[_Iterable[_Union[ModelActivity, _Mapping]]] = ...) -> None: ...

class ModelActivity(_message.Message):
    __slots__ = ("deployment", "idle_seconds", "in_flight", "replicas", "held")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    idle_seconds: float
    in_flight: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaLoad]
    held: int
    def __init__(self, deployment: _Optional[str] = ..., idle_seconds: _Optional[float] = ..., in_flight: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaLoad, _Mapping]]] = ..., held: _Optional[int] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("instance_id", "outstanding", "running", "waiting", "capacity")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    outstanding: int
    running: int
    waiting: int
    capacity: int
    def __init__(self, instance_id: _Optional[str] = ..., outstanding: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("term", "leader_id", "peer_restarts", "agent_version", "state_format", "join_raft", "cluster_time", "resend_inventory")
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JOIN_RAFT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TIME_FIELD_NUMBER: _ClassVar[int]
    RESEND_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    term: int
    leader_id: str
    peer_restarts: _containers.RepeatedCompositeFieldContainer[PeerRestart]
    agent_version: str
    state_format: int
    join_raft: bool
    cluster_time: float
    resend_inventory: bool
    def __init__(self, term: _Optional[int] = ..., leader_id: _Optional[str] = ..., peer_restarts: _Optional[_Iterable[_Union[PeerRestart, _Mapping]]] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., join_raft: _Optional[bool] = ..., cluster_time: _Optional[float] = ..., resend_inventory: _Optional[bool] = ...) -> None: ...

class ReportUpdate(_message.Message):
    __slots__ = ("node", "address", "inventory_json", "instances_changed", "instances", "agent_version", "state_format", "wire_version", "upgrade_required", "wall_time", "activity", "watches_from", "inventory_digest")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    WATCHES_FROM_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    inventory_json: str
    instances_changed: bool
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    agent_version: str
    state_format: int
    wire_version: int
    upgrade_required: str
    wall_time: float
    activity: _containers.RepeatedCompositeFieldContainer[ModelActivity]
    watches_from: str
    inventory_digest: bytes
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., inventory_json: _Optional[str] = ..., instances_changed: _Optional[bool] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., wire_version: _Optional[int] = ..., upgrade_required: _Optional[str] = ..., wall_time: _Optional[float] = ..., activity: _Optional[_Iterable[_Union[ModelActivity, _Mapping]]] = ..., watches_from: _Optional[str] = ..., inventory_digest: _Optional[bytes] = ...) -> None: ...

class PeerRestart(_message.Message):
    __slots__ = ("address", "port", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    reason: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RelayBatch(_message.Message):
    __slots__ = ("relay", "updates", "live")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    relay: str
    updates: _containers.RepeatedCompositeFieldContainer[ReportUpdate]
    live: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, relay: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[ReportUpdate, _Mapping]]] = ..., live: _Optional[_Iterable[str]] = ...) -> None: ...

class RelayHostReply(_message.Message):
    __slots__ = ("node", "peer_restarts", "join_raft", "refused_code", "refused", "resend_inventory")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PEER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    JOIN_RAFT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_CODE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    RESEND_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    node: str
    peer_restarts: _containers.RepeatedCompositeFieldContainer[PeerRestart]
    join_raft: bool
    refused_code: int
    refused: str
    resend_inventory: bool
    def __init__(self, node: _Optional[str] = ..., peer_restarts: _Optional[_Iterable[_Union[PeerRestart, _Mapping]]] = ..., join_raft: _Optional[bool] = ..., refused_code: _Optional[int] = ..., refused: _Optional[str] = ..., resend_inventory: _Optional[bool] = ...) -> None: ...

class RelayReply(_message.Message):
    __slots__ = ("term", "leader_id", "agent_version", "state_format", "cluster_time", "hosts", "takes_digests")
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TIME_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    TAKES_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    term: int
    leader_id: str
    agent_version: str
    state_format: int
    cluster_time: float
    hosts: _containers.RepeatedCompositeFieldContainer[RelayHostReply]
    takes_digests: bool
    def __init__(self, term: _Optional[int] = ..., leader_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., state_format: _Optional[int] = ..., cluster_time: _Optional[float] = ..., hosts: _Optional[_Iterable[_Union[RelayHostReply, _Mapping]]] = ..., takes_digests: _Optional[bool] = ...) -> None: ...
