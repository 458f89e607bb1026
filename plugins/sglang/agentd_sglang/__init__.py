"""agentd runtime plugin for SGLang, written the way a third party would: it imports only
agentd.plugins.api and agentd.types (docs/plugins.md)."""
