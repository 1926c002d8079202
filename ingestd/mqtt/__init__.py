"""Speaking MQTT, and nothing of readings: the one adapter over aiomqtt and
paho (`link`), the sans-IO packet code it uses (`wire`) and the socket it
reads through (`buffered`), topic filters and the subscription plan
(`topics`), and what a connection needs around it (`connect`: TLS, what a
refusal means)."""
