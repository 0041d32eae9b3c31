"""The protocol-neutral inference model both edges decode into and encode from: the request and response
(``inference``), the V2 tensor datatypes (``datatypes``), tensor payloads <-> numpy with their size checks
(``tensors``), the checks of a request against what a model accepts (``validation``), and the one strict rule
for numbers that arrive as text (``numbers``). Nothing here knows HTTP, gRPC, the repository or a runtime."""
