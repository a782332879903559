"""AEGIS serving: an OpenAI-compatible API and a chat front end."""
