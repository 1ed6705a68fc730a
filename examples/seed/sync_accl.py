# ruff: noqa: I001  (kept as the API document writes it)
# Example from the API document (SyncAccl), laid out line by line. Changed only where
# this machine needs it: MobileNet(weights=None), since no weights can be downloaded.
# Needs the tf extra: pip install 'memryx[tf]'
import tensorflow as tf
import numpy as np
from memryx import NeuralCompiler, SyncAccl

# Compile a MobileNet model for testing.
# Typically, comilation need to be done one time only.
model = tf.keras.applications.MobileNet(weights=None)
nc = NeuralCompiler(models=model)
dfp = nc.run()

# Prepare the input data
img = np.random.rand(224,224,3).astype(np.float32)
data = tf.keras.applications.mobilenet.preprocess_input(img)

# Accelerate using the MemryX hardware
accl = SyncAccl(dfp)
outputs = accl.run(data) # Run sequential acceleration on the input data.
