"""`sftkit web-ui`: a browser page over the library (needs the webui extra: pip install 'sftkit[webui]')."""
