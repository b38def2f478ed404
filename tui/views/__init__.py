"""The two views of the app: the mesh (nodes, layers, events) and the chat."""
