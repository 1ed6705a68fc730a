# ruff: noqa: I001, B007  (kept as the API document writes it)
# Example from the API document (AsyncAccl), laid out line by line. Changed only where
# this machine needs it: MobileNet(weights=None), since no weights can be downloaded, and
# the top-5 class indices instead of decode_predictions (which downloads the class names);
# the frames and results are kept in two lists so the outputs can be checked.
# Needs the tf extra: pip install 'memryx[tf]'
import tensorflow as tf
import numpy as np
from memryx import NeuralCompiler, AsyncAccl

frames, results = [], []

# define the callback that will return model input data
def data_source():
    for i in range(10):
        img = np.random.rand(224,224,3).astype(np.float32)
        data = tf.keras.applications.mobilenet.preprocess_input(img)
        frames.append(data)
        yield data

# define the callback that will process the outputs of the model
def output_processor(*outputs):
    logits = np.squeeze(outputs[0], 0)
    preds = np.argsort(logits)[::-1][:5]
    results.append((logits, preds))

# Compile a MobileNet model for testing.
# Typically, comilation need to be done one time only.
model = tf.keras.applications.MobileNet(weights=None)
nc = NeuralCompiler(models=model)
dfp = nc.run()

# Accelerate using the MemryX hardware
accl = AsyncAccl(dfp)
accl.connect_input(data_source) # starts asynchronous execution of input generating callback
accl.connect_output(output_processor) # starts asynchronous execution of output processing callback
accl.wait() # wait for the accelerator to finish execution
